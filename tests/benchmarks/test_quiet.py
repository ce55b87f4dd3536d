"""others_cpu: the CPU the benchmark's own process tree used is not counted against it; the
machine's other busy time is, as a share of wall time × cores."""

import subprocess
import sys

from benchmarks.harness.quiet import CpuSample, others_cpu, sample

BURN = "import time\nwhile time.process_time() < 1.0: pass"


def test_a_child_process_counts_as_the_benchmarks_own_cpu():
    start = sample()
    subprocess.run([sys.executable, "-c", BURN], check=True)  # reaped: os.times' children
    child = subprocess.Popen([sys.executable, "-c", BURN + "\nimport time; time.sleep(30)"])
    try:
        # Live: read from /proc; the tree's time reaches both children's two seconds.
        end = sample()
        while end.tree - start.tree < 1.9 and end.wall - start.wall < 120:
            end = sample()
    finally:
        child.kill()
        child.wait()
    assert end.tree - start.tree >= 1.9, end
    assert end.busy - start.busy >= 1.9  # the machine saw it busy too


def test_others_share_of_the_machine():
    start = CpuSample(busy=100.0, tree=10.0, wall=0.0)
    # 4 busy seconds in 2 s on 2 cores, 3 of them the benchmark's: others used 1 of 4.
    assert others_cpu(start, CpuSample(104.0, 13.0, 2.0), cores=2) == 0.25
    assert others_cpu(start, CpuSample(103.0, 13.0, 2.0), cores=2) == 0.0  # never negative
