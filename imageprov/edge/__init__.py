"""The mTLS edge in front of the Mender server."""
