"""The file system on one volume: the metadata cache and operations, allocation, B+trees, file contents, directories, POSIX semantics, orphan scans, the single-node mount."""
