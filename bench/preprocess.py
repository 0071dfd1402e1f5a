"""Preprocessing throughput per CPU core (one thread), written to bench/results/preprocess-<host>.json.

    python -m bench.preprocess [--seconds S] [--out PATH]

Inputs: a 1920x1080 JPEG (a real photo, upscaled), a 30 s 48 kHz FLAC and a 10 s MP3 (real speech).
Rows measured:
- cpu_stage.*: what phi4mm-batch's CPU actors do per item (decode, EXIF/RGB, mono, resample to 16 kHz,
  prompt and exact token count): images/s and audio-seconds/s.
- gpu_actor.*: media work that still happens in the GPU actor's process, inside vLLM's input processing,
  by the checkpoint's own processor (here: the tiny checkpoint's numpy/PIL processor, which follows the
  original's resize/pad/crop/mel steps): crops/s at dynamic_hd 4 and 16, audio-seconds/s; and the share
  of the GPU actor's per-row CPU time it takes, against the engine time given by --engine-ms-per-row.
- peer.*: transformers' own Phi4Multimodal image processor and feature extractor on the same inputs,
  where they import (the image processor needs torchvision).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # per-core figures
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from bench.report import write_report  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MEDIA = REPO / "jobs" / "sample_media"


def make_inputs() -> dict[str, bytes]:
    import soundfile as sf
    from PIL import Image
    from scipy.signal import resample_poly

    photo = Image.open(MEDIA / "coffee.jpg").convert("RGB").resize((1920, 1080), Image.BICUBIC)
    jpeg = io.BytesIO()
    photo.save(jpeg, format="JPEG", quality=90)
    speech, rate = sf.read(MEDIA / "fox.wav", dtype="float32")  # 16 kHz speech, 3.4 s
    at48 = resample_poly(speech, 3, 1).astype(np.float32)
    long48 = np.tile(at48, int(np.ceil(30 * 48000 / len(at48))))[: 30 * 48000]
    flac = io.BytesIO()
    sf.write(flac, long48, 48000, format="FLAC")
    mp3_src = np.tile(speech, int(np.ceil(10 * rate / len(speech))))[: 10 * rate]
    mp3 = io.BytesIO()
    sf.write(mp3, mp3_src, rate, format="MP3")
    return {"jpeg_1080p": jpeg.getvalue(), "flac_30s_48k": flac.getvalue(), "mp3_10s": mp3.getvalue()}


def rate(fn, seconds: float) -> tuple[float, int]:
    """Calls per second of fn over at least `seconds` (after one warm-up call)."""
    fn()
    n, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or n < 3:
        fn()
        n += 1
    return n / elapsed, n


def bench_cpu_stage(inputs, seconds) -> dict:
    from actors.media import decode_audio, decode_image
    from actors.prompt import build_prompt
    from actors.tokens import num_audio_tokens, num_image_tokens

    out = {}
    r, _ = rate(lambda: decode_image(inputs["jpeg_1080p"], "bench", 10**9), seconds)
    out["cpu_stage.image_decode_1080p_jpeg.images_per_s"] = r

    def image_row():
        im = decode_image(inputs["jpeg_1080p"], "bench", 10**9)
        build_prompt("Describe the image.", 1, 0)
        return num_image_tokens(im.width, im.height, 16)

    out["cpu_stage.image_row_1080p_jpeg.rows_per_s"] = rate(image_row, seconds)[0]
    for name, seconds_of_audio in (("flac_30s_48k", 30.0), ("mp3_10s", 10.0)):
        fn = lambda data=inputs[name]: num_audio_tokens(len(decode_audio(data, "bench", 0.025, 3600).samples))  # noqa: E731
        out[f"cpu_stage.audio_{name}.audio_s_per_s"] = rate(fn, seconds)[0] * seconds_of_audio
    return out


def bench_gpu_actor_media(inputs, seconds, engine_ms_per_row: float) -> dict:
    """The checkpoint processor's work, as vLLM runs it in the GPU actor's process for every request."""
    import importlib.util

    from PIL import Image

    from actors.media import decode_audio

    spec = importlib.util.spec_from_file_location(
        "tiny_proc", REPO / "jobs" / "tiny_model" / "processing_phi4mm_tiny.py"
    )
    proc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(proc)
    image = Image.open(io.BytesIO(inputs["jpeg_1080p"])).convert("RGB")
    out = {}
    for hd in (4, 16):
        ip = proc.Phi4MMTinyImageProcessor(dynamic_hd=hd)
        crops = ip([image])["input_image_embeds"].shape[1]
        per_s, _ = rate(lambda ip=ip: ip([image]), seconds)
        out[f"gpu_actor.image_processor_dhd{hd}.crops_per_s"] = per_s * crops
        out[f"gpu_actor.image_processor_dhd{hd}.images_per_s"] = per_s
        out[f"gpu_actor.image_processor_dhd{hd}.cpu_share_of_row"] = (1000 / per_s) / (
            1000 / per_s + engine_ms_per_row
        )
    ap = proc.Phi4MMTinyAudioProcessor()
    wav = decode_audio(inputs["flac_30s_48k"], "bench", 0.025, 3600).samples
    per_s, _ = rate(lambda: ap([(wav, 16000)]), seconds)
    out["gpu_actor.audio_features_30s.audio_s_per_s"] = per_s * 30
    out["gpu_actor.audio_features_30s.cpu_share_of_row"] = (1000 / per_s) / (1000 / per_s + engine_ms_per_row)
    return out


def bench_peer(inputs, seconds) -> dict:
    out = {}
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        return {"peer.error": "torch is not installed"}
    try:
        from PIL import Image
        from transformers import Phi4MultimodalImageProcessorFast

        image = Image.open(io.BytesIO(inputs["jpeg_1080p"])).convert("RGB")
        for hd in (4, 16):
            ip = Phi4MultimodalImageProcessorFast(dynamic_hd=hd)
            crops = ip(image, return_tensors="pt")["image_pixel_values"].shape[1]
            per_s, _ = rate(lambda ip=ip: ip(image, return_tensors="pt"), seconds)
            out[f"peer.transformers_image_processor_dhd{hd}.crops_per_s"] = per_s * crops
            out[f"peer.transformers_image_processor_dhd{hd}.images_per_s"] = per_s
    except Exception as e:  # torchvision missing (CPU torch here), or an API change
        out["peer.image_processor_error"] = f"{type(e).__name__}: {e}"[:300]
    try:
        from transformers import Phi4MultimodalFeatureExtractor

        from actors.media import decode_audio

        fe = Phi4MultimodalFeatureExtractor()
        wav = decode_audio(inputs["flac_30s_48k"], "bench", 0.025, 3600).samples
        per_s, _ = rate(lambda: fe(wav, sampling_rate=16000, return_tensors="pt"), seconds)
        out["peer.transformers_feature_extractor_30s.audio_s_per_s"] = per_s * 30
    except Exception as e:
        out["peer.feature_extractor_error"] = f"{type(e).__name__}: {e}"[:300]
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="Time per measurement.")
    parser.add_argument("--engine-ms-per-row", type=float, default=50.0,
                        help="Engine time per row to weigh the GPU actor's media CPU time against.")  # fmt: skip
    parser.add_argument("--out", help="JSON path (default bench/results/preprocess-<host>.json).")
    args = parser.parse_args(argv)
    inputs = make_inputs()
    figures = {}
    figures.update(bench_cpu_stage(inputs, args.seconds))
    figures.update(bench_gpu_actor_media(inputs, args.seconds, args.engine_ms_per_row))
    figures.update(bench_peer(inputs, args.seconds))
    write_report("preprocess", figures, args.out, threads=1, engine_ms_per_row=args.engine_ms_per_row,
                 cpu=platform.processor() or platform.machine())  # fmt: skip


if __name__ == "__main__":
    main()
