"""The production line's jobs: stamping per-device images from a golden image."""
