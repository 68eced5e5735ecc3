"""Which calls on the decode and upload paths hand the GIL over? (CPU; no GPU needed.)

A second thread spins in Python while the main thread times each call with the switch interval
set to 50 ms: a call that releases the GIL must wait for the spinning thread to be forced off,
so it takes ~50 ms instead of microseconds. Beside a forward thread running model Python, each
such call costs a decode worker (or the uploader) a wait for the GIL.

    python docs/probes/gil_release.py
"""

import sys
import threading
import time

import numpy as np
import torch
import zstandard as zstd

from vzstream import image

INTERVAL = 0.05


def calls():
    t = torch.empty(1 << 20, dtype=torch.uint8)
    weights = (torch.randn(1 << 20) * 0.02).to(torch.bfloat16)
    frame = image.pack_image([weights], 512, lambda n: torch.empty(n, dtype=torch.uint8), "zstd")[0].frames[0]
    dctx, dst = zstd.ZstdDecompressor(), np.empty(frame.nbytes, np.uint8)

    def readinto():
        reader = dctx.stream_reader(frame.data)
        reader.readinto(memoryview(dst))
        return reader

    done = readinto()
    return {
        "tensor[a:b]": lambda: t[10:100],
        "tensor.detach()": lambda: t.detach(),
        "tensor.reshape(-1)": lambda: t.reshape(-1),
        "tensor.view(torch.uint8)": lambda: t.view(torch.uint8),
        "tensor.numpy()": lambda: t.numpy(),
        "tensor + 1 (any op)": lambda: t[:16] + 1,
        "ndarray[a:b]": lambda: dst[10:100],
        "memoryview(ndarray).cast('B')": lambda: memoryview(dst).cast("B"),
        "zstd.frame_content_size": lambda: zstd.frame_content_size(frame.data),
        "dctx.stream_reader(frame)": lambda: dctx.stream_reader(frame.data),
        "reader.readinto(1 MiB)": readinto,
        "reader.read(1) at frame end": lambda: done.read(1),
        "np.copyto (512 KiB)": lambda: np.copyto(dst[: 1 << 19], dst[1 << 19 :]),
    }


def main() -> None:
    table = calls()
    sys.setswitchinterval(INTERVAL)
    stop = False

    def spin():
        while not stop:
            pass

    spinner = threading.Thread(target=spin)
    spinner.start()
    time.sleep(0.1)
    try:
        for name, fn in table.items():
            t0 = time.perf_counter()
            for _ in range(5):
                fn()
            ms = (time.perf_counter() - t0) / 5 * 1e3
            print(f"{name:32s} {ms:8.2f} ms  {'hands the GIL over' if ms > INTERVAL * 1e3 / 3 else ''}")
    finally:
        stop = True
        spinner.join()


if __name__ == "__main__":
    main()
