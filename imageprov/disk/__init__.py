"""Disk images: partition tables, filesystems edited in place, copies of images.

Knows nothing of Mender or certificates; everything above builds on it.
"""
