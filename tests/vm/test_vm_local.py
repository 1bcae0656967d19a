"""Issue 6 on a local directory: save a running guest on "host A", restore it on "host B".

Both hosts see the same local directory (the anchor the clusterfs run is compared with).
Boots a real Debian kernel under QEMU (software emulation): about 20 s once the guest is
cached, plus the first run's `apt-get install qemu-system-x86 qemu-utils` and downloads.
"""

import pytest

from .guest import GuestUnavailable, build_guest, ensure_host_tools
from .scenario import run_scenario
from .storage import LocalStorage

pytestmark = [pytest.mark.vm, pytest.mark.timeout(400)]


@pytest.fixture(scope="module")
def guest():
    try:
        ensure_host_tools()
        return build_guest()
    except GuestUnavailable as e:
        pytest.skip(f"cannot run a VM guest here: {e}")


def test_save_on_a_restore_on_b_local_dir(guest, tmp_path):
    res = run_scenario(tmp_path, tmp_path, guest=guest, mem_mib=128, fill_mib=32,
                       records_before=5, records_after=5)
    # run_scenario raises ScenarioFailed on any broken assertion; these restate the key ones.
    assert res.records_on_a >= 5 and res.records_on_b >= 5
    assert res.last_seq + 1 == res.records_on_a + res.records_on_b
    assert res.state_bytes >= 32 << 20
    assert res.uptime_step_s < 5.2
    assert res.save_s > 0 and res.restore_s > 0
    assert not list(tmp_path.iterdir()), "disk and state file removed after the run"


def test_local_storage_views_are_one_directory(tmp_path):
    with LocalStorage(tmp_path).views() as (a, b):
        assert a == b and a.is_dir()
        (a / "f").write_text("x")
        assert (b / "f").read_text() == "x"
    assert not a.exists()
