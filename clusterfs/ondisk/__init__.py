"""The bytes on the device: block header and crc32c, the format of every structure, block-device access, node slots and their heartbeats."""
