"""A hung test fails in bounded time and still stops the processes it started (pytest-timeout, signal method)."""
import subprocess
import sys
import textwrap

from fedfar.federation.processes import process_tree

HUNG_TEST = '''
import subprocess, time, pytest
from fedfar.federation.processes import stop_process_tree

@pytest.mark.timeout(3)
def test_hangs_with_a_process_tree():
    # a parent with two children in its own session, like flower-superlink and its daemons
    proc = subprocess.Popen(["bash", "-c", "sleep 300 & sleep 300 & wait"], start_new_session=True)
    with open("pid", "w") as f:
        f.write(str(proc.pid))
    try:
        time.sleep(300)
    finally:
        stop_process_tree(proc, timeout=2)
'''


def test_a_hung_test_times_out_and_leaves_no_process(tmp_path):
    (tmp_path / "test_hung.py").write_text(textwrap.dedent(HUNG_TEST))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "timeout_method=signal",
                          "test_hung.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Timeout" in out.stdout and "1 failed" in out.stdout
    pid = int((tmp_path / "pid").read_text())
    assert process_tree(pid) == set()  # the parent and both sleeps are gone

