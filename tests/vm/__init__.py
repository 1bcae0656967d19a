"""End-to-end VM tests: a small real guest under QEMU, saved on one host, restored on another.

| module | job |
|---|---|
| `guest.py` | builds (and caches) the guest kernel + initramfs from Debian packages; host tool install |
| `qmp.py` | QMP client and the guest's control/console channels |
| `machine.py` | one QEMU process: command line, start, stop, kill by PID |
| `scenario.py` | the save-on-A / restore-on-B scenario of issue 6, over two views of one storage |
| `storage.py` | where the two views come from: a local directory now, two clusterfs mounts later |
"""
