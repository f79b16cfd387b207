"""The settled configuration and the training loop. Imports the layers below."""
