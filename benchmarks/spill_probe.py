"""Does spilling layer-boundary tensors to a memory-mapped file lower peak RSS on the CPU?

    python benchmarks/spill_probe.py memory    # four 128 MB boundary tensors kept in memory
    python benchmarks/spill_probe.py mmap      # the same, each copied into a memory-mapped temp file

Between boundaries a 256 MB working set comes and goes (the next layer). Prints the rise of the
process's peak and current resident memory. See docs/long-sequences.md.
"""
import os, sys, tempfile, torch
mode = sys.argv[1]
def hwm(): return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
def rss(): return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024
base = hwm()
n = 32 * 2**20  # float32 elements: 128 MB
kept = []
for i in range(4):
    boundary = torch.randn(n)
    if mode == "mmap":
        handle, path = tempfile.mkstemp()
        os.close(handle)
        spilled = torch.from_file(path, shared=True, size=n, dtype=torch.float32)
        spilled.copy_(boundary)
        os.unlink(path)
        kept.append(spilled)
    else:
        kept.append(boundary)
    del boundary
    work = torch.randn(2 * n)  # the next layer's working set (256 MB)
    del work
print(mode, "peak rise MB", round(hwm() - base), "rss now MB", round(rss() - base))
