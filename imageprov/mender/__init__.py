"""What Mender devices and tools expect: mender.conf, the credentials' paths and modes, verification."""
