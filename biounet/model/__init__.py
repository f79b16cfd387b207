"""The framework chosen once (backend), the U-Net, the losses and the checkpoint format. Imports core,
data and evaluation."""
