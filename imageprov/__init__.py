"""imageprov: stamp per-device Mender client credentials into disk images."""

__version__ = "0.1.0"
