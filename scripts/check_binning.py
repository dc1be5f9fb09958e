#!/usr/bin/env python3
"""N-MNIST event files binned into frames by tonic and SpikingJelly themselves, so that
tests/nmnist_binning.rs can compare backei's --binning conventions with them exactly.

usage: check_binning.py OUT_DIR T[,T...] FILE...

For file k, each T and each convention, writes OUT_DIR/<k>-T<T>-<convention>.u8: the T×2×34×34
per-pixel event counts (frame, polarity, y, x; counts above 255 clipped, as backei stores them),
or <k>-T<T>-<convention>.err with the exception the library raised. Conventions:
  tonic-time           tonic.transforms.ToFrame(sensor_size, n_time_bins=T)
  tonic-events         tonic.transforms.ToFrame(sensor_size, n_event_bins=T)
  spikingjelly-time    spikingjelly.datasets.integrate_events_by_fixed_frames_number(split_by='time')
  spikingjelly-number  the same with split_by='number'
Events are read the way each library's N-MNIST dataset reads them: tonic.io.read_mnist_file with
tonic.datasets.NMNIST's dtype, spikingjelly.datasets.load_ATIS_bin.
"""
import importlib.metadata
import pathlib
import sys

import numpy as np
import tonic
import spikingjelly.datasets as sjds


def tonic_frames(path, T, **bins):
    events = tonic.io.read_mnist_file(str(path), dtype=tonic.datasets.NMNIST.dtype)
    return tonic.transforms.ToFrame(sensor_size=tonic.datasets.NMNIST.sensor_size, **bins)(events)


def sj_frames(path, T, split_by):
    events = sjds.load_ATIS_bin(str(path))
    return sjds.integrate_events_by_fixed_frames_number(events, split_by, T, 34, 34)


CONVENTIONS = {
    "tonic-time": lambda p, T: tonic_frames(p, T, n_time_bins=T),
    "tonic-events": lambda p, T: tonic_frames(p, T, n_event_bins=T),
    "spikingjelly-time": lambda p, T: sj_frames(p, T, "time"),
    "spikingjelly-number": lambda p, T: sj_frames(p, T, "number"),
}


def main():
    out = pathlib.Path(sys.argv[1])
    steps = [int(t) for t in sys.argv[2].split(",")]
    out.mkdir(parents=True, exist_ok=True)
    for k, path in enumerate(sys.argv[3:]):
        for T in steps:
            for name, frames_of in CONVENTIONS.items():
                stem = out / f"{k}-T{T}-{name}"
                try:
                    frames = np.asarray(frames_of(path, T))
                except Exception as e:  # the library's own failure is part of the comparison
                    stem.with_suffix(".err").write_text(f"{type(e).__name__}: {e}")
                    continue
                if frames.shape != (T, 2, 34, 34):
                    stem.with_suffix(".err").write_text(f"shape {frames.shape}")
                    continue
                stem.with_suffix(".u8").write_bytes(np.clip(frames, 0, 255).astype(np.uint8).tobytes())
    v = importlib.metadata.version
    print(f"tonic {v('tonic')}, spikingjelly {v('spikingjelly')}, numpy {np.__version__}")


if __name__ == "__main__":
    main()
