"""clusterfs: a clustered shared-disk file system on FUSE.

Importing this package must stay cheap and must not import pyfuse3: the journal,
fsck and the CLI use the format modules without FUSE.
"""

__version__ = "0.1.0"
