"""The model out as ONNX and bioimage.io packages. Imports the layers below."""
