"""Preprocessing throughput per CPU core (one thread), written to bench/results/preprocess-<host>.json.

    python -m bench.preprocess [--seconds S] [--engine] [--out PATH]

Inputs: a 1920x1080 JPEG (a real photo, upscaled), a 30 s 48 kHz FLAC and a 10 s MP3 (real speech).
Figures:
- cpu_stage.*: phi4mm-batch's CPU actors. ``image_canvas_dhd{4,16}``: the model's image input from a decoded
  picture (resize into the crop grid + pad, masks, token count), as crops/s and images/s; ``image_row_*``:
  the same from the JPEG's bytes (decode, EXIF, RGB included). ``audio_features_30s``: log-mel features of
  a 16 kHz clip; ``audio_row_*``: decode + mono + resample to 16 kHz + features, from the file's bytes.
- gpu_actor.*: media work left in the GPU actor's process per row: turning a prepared row into the
  engine's tensors (zero-copy views), and finishing the canvas into normalized crops + global view
  (``actors.features.crops_from_canvas``; on a GPU this runs on the device, and its CPU time is what the
  process spends launching it). ``cpu_share_of_row`` weighs the CPU time against --engine-ms-per-row.
  With --engine (vLLM installed): the CPU time of vLLM's own input processing per request
  (``LLMEngine.add_request``), prepared inputs against raw media, on the tiny checkpoint.
- peer.*: transformers' Phi4Multimodal image processor (needs torchvision) and feature extractor on the
  same decoded inputs, and per row from the same bytes (same decoder as ours); parity.*: how far our
  model inputs are from theirs.
- ratio.*: ours / peer, the figure the issue's 1.5x target is about.
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
HD = (4, 16)
NO_LIMIT = 10**9


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


def rate(fn, seconds: float) -> float:
    """Calls per second of fn over at least `seconds` (after one warm-up call)."""
    fn()
    n, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or n < 3:
        fn()
        n += 1
    return n / elapsed


def cpu_ms(fn, seconds: float) -> float:
    """Process CPU milliseconds per call of fn."""
    fn()
    n, wall, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - wall < seconds or n < 3:
        fn()
        n += 1
    return (time.process_time() - cpu) * 1000 / n


def _audio_seconds(data: bytes) -> float:
    from actors.media import decode_audio

    return decode_audio(data, "bench", 0.025, 3600).seconds


def bench_cpu_stage(inputs, seconds) -> dict:
    from actors.features import image_canvas, log_mel
    from actors.media import decode_audio, decode_image

    out = {}
    jpeg = inputs["jpeg_1080p"]
    picture = decode_image(jpeg, "bench", NO_LIMIT).image
    for hd in HD:
        crops = image_canvas(picture, hd).crops
        per_s = rate(lambda hd=hd: image_canvas(picture, hd), seconds)
        out[f"cpu_stage.image_canvas_dhd{hd}.crops_per_s"] = per_s * crops
        out[f"cpu_stage.image_canvas_dhd{hd}.images_per_s"] = per_s
        per_s = rate(lambda hd=hd: image_canvas(decode_image(jpeg, "bench", NO_LIMIT).image, hd), seconds)
        out[f"cpu_stage.image_row_jpeg_1080p_dhd{hd}.crops_per_s"] = per_s * crops
        out[f"cpu_stage.image_row_jpeg_1080p_dhd{hd}.images_per_s"] = per_s
    wave30 = decode_audio(inputs["flac_30s_48k"], "bench", 0.025, 3600).samples
    out["cpu_stage.audio_features_30s.audio_s_per_s"] = rate(lambda: log_mel(wave30), seconds) * 30
    for name in ("flac_30s_48k", "mp3_10s"):
        data, secs = inputs[name], _audio_seconds(inputs[name])
        per_s = rate(lambda data=data: log_mel(decode_audio(data, "bench", 0.025, 3600).samples), seconds)
        out[f"cpu_stage.audio_row_{name}.audio_s_per_s"] = per_s * secs
    return out


def bench_gpu_actor(inputs, seconds, engine_ms_per_row: float) -> dict:
    """Media CPU time per row in the GPU actor's process, outside vLLM."""
    import torch

    from actors.engine import EngineRequest, engine_prompt, image_inputs
    from actors.features import crops_from_canvas, image_canvas
    from actors.media import decode_image
    from actors.preprocess import _prepared_audio

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = {"gpu_actor.device": device}
    picture = decode_image(inputs["jpeg_1080p"], "bench", NO_LIMIT).image
    for hd in HD:
        canvas = image_canvas(picture, hd)
        prepared = {"canvas": canvas.pixels.tobytes(), "width": canvas.pixels.shape[1],
                    "height": canvas.pixels.shape[0], "mask": canvas.mask.tobytes(),
                    "tokens": canvas.num_tokens, "uuid": "bench"}  # fmt: skip
        request = EngineRequest(prompt="<|user|><|image_1|>x<|end|><|assistant|>", images=[prepared])
        build = cpu_ms(lambda r=request: engine_prompt(r), seconds)
        on_device = torch.from_numpy(canvas.pixels).to(device)

        def finish(c=on_device):
            crops = crops_from_canvas(c)
            if device == "cuda":
                torch.cuda.synchronize()
            return crops

        finish_ms = cpu_ms(finish, seconds)
        media_ms = build + finish_ms
        out[f"gpu_actor.image_dhd{hd}.request_build_cpu_ms"] = build
        out[f"gpu_actor.image_dhd{hd}.canvas_finish_cpu_ms"] = finish_ms
        out[f"gpu_actor.image_dhd{hd}.cpu_share_of_row"] = media_ms / (media_ms + engine_ms_per_row)
        assert image_inputs([prepared])["image_canvas"][0].shape == canvas.pixels.shape
    from actors.media import decode_audio

    wave = decode_audio(inputs["flac_30s_48k"], "bench", 0.025, 3600).samples
    request = EngineRequest(prompt="<|user|><|audio_1|>x<|end|><|assistant|>", audios=[_prepared_audio(wave)])
    build = cpu_ms(lambda: engine_prompt(request), seconds)
    out["gpu_actor.audio_30s.request_build_cpu_ms"] = build
    out["gpu_actor.audio_30s.cpu_share_of_row"] = build / (build + engine_ms_per_row)
    return out


def bench_vllm_input_processing(inputs, seconds) -> dict:
    """CPU ms of LLMEngine.add_request per request: prepared inputs vs raw media (the checkpoint processor
    inside vLLM), on the tiny checkpoint, dynamic_hd 16."""
    import tempfile

    import pyarrow as pa

    from actors.engine import Phi4MMEngine, engine_prompt
    from actors.generate import to_engine_requests
    from actors.media import decode_audio, decode_image
    from actors.preprocess import PreprocessRows
    from jobs.make_tiny_model import write_tiny_checkpoint
    from schemas.job import JobConfig
    from schemas.rows import MEDIA_STRUCT

    tmp = Path(tempfile.mkdtemp())
    model = write_tiny_checkpoint(tmp / "tiny", dynamic_hd=16)
    config = JobConfig.model_validate({
        "input": {"path": str(tmp / "in.parquet")}, "output": {"path": str(tmp / "out")},
        "model": {"path": str(model), "load_format": "dummy", "use_lora": False},
        "engine": {"dtype": "float32", "max_model_len": 8192, "dynamic_hd": 16, "enforce_eager": True,
                   "executor": "uni", "init_hook": "jobs.tiny_vision:shrink_siglip"},
    })  # fmt: skip
    engine = Phi4MMEngine(config)
    rows = [{"id": "img", "image": {"bytes": inputs["jpeg_1080p"], "path": None}, "audio": None},
            {"id": "aud", "image": None, "audio": {"bytes": inputs["flac_30s_48k"], "path": None}}]  # fmt: skip
    schema = pa.schema([("id", pa.string()), ("image", MEDIA_STRUCT), ("audio", MEDIA_STRUCT)])
    img_row, aud_row = PreprocessRows(config)(pa.Table.from_pylist(rows, schema=schema)).to_pylist()
    raw_image = decode_image(inputs["jpeg_1080p"], "bench", NO_LIMIT).image
    raw_audio = decode_audio(inputs["flac_30s_48k"], "bench", 0.025, 3600).samples
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1)
    llm_engine = engine.llm.llm_engine
    counter = iter(range(10**9))

    def add(prompt):
        request_id = f"bench-{next(counter)}"
        llm_engine.add_request(request_id, prompt, params)
        llm_engine.abort_request([request_id])

    out = {}
    for name, row, raw in (("image_dhd16", img_row, {"image": raw_image}),
                           ("audio_30s", aud_row, {"audio": (raw_audio, 16000)})):  # fmt: skip
        (request,) = to_engine_requests(row)
        out[f"gpu_actor.vllm_input_processing_{name}.prepared_cpu_ms"] = cpu_ms(
            lambda r=request: add(engine_prompt(r)), seconds
        )
        out[f"gpu_actor.vllm_input_processing_{name}.raw_media_cpu_ms"] = cpu_ms(
            lambda p=row["prompt"], mm=raw: add({"prompt": p, "multi_modal_data": mm}), seconds
        )
    return out


def bench_peer(inputs, seconds) -> dict:
    out = {}
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        return {"peer.error": "torch is not installed"}
    from actors.features import crops_from_canvas, image_canvas, log_mel
    from actors.media import decode_audio, decode_image

    jpeg = inputs["jpeg_1080p"]
    try:
        from transformers import Phi4MultimodalImageProcessorFast

        picture = decode_image(jpeg, "bench", NO_LIMIT).image
        for hd in HD:
            ip = Phi4MultimodalImageProcessorFast(dynamic_hd=hd)
            ref = ip(picture, return_tensors="pt")["image_pixel_values"][0]
            per_s = rate(lambda ip=ip: ip(picture, return_tensors="pt"), seconds)
            out[f"peer.transformers_image_processor_dhd{hd}.crops_per_s"] = per_s * ref.shape[0]
            out[f"peer.transformers_image_processor_dhd{hd}.images_per_s"] = per_s
            per_s = rate(
                lambda ip=ip: ip(decode_image(jpeg, "bench", NO_LIMIT).image, return_tensors="pt"), seconds
            )
            out[f"peer.transformers_image_row_jpeg_1080p_dhd{hd}.crops_per_s"] = per_s * ref.shape[0]
            ours = crops_from_canvas(torch.from_numpy(image_canvas(picture, hd).pixels))
            # transformers resizes a tensor (torchvision, antialiased bilinear), the original a PIL image
            # (PIL bilinear): a little apart on [-1, 1] pixels
            out[f"parity.image_dhd{hd}.mean_abs_diff_vs_transformers"] = float((ours - ref).abs().mean())
            out[f"parity.image_dhd{hd}.max_abs_diff_vs_transformers"] = float((ours - ref).abs().max())
    except Exception as e:  # torchvision missing (CPU torch here), or an API change
        out["peer.image_processor_error"] = f"{type(e).__name__}: {e}"[:300]
    try:
        from transformers import Phi4MultimodalFeatureExtractor

        fe = Phi4MultimodalFeatureExtractor()
        wave30 = decode_audio(inputs["flac_30s_48k"], "bench", 0.025, 3600).samples
        per_s = rate(lambda: fe(wave30, sampling_rate=16000, return_tensors="pt"), seconds)
        out["peer.transformers_feature_extractor_30s.audio_s_per_s"] = per_s * 30
        for name in ("flac_30s_48k", "mp3_10s"):
            data, secs = inputs[name], _audio_seconds(inputs[name])
            per_s = rate(
                lambda data=data: fe(decode_audio(data, "bench", 0.025, 3600).samples, sampling_rate=16000,
                                     return_tensors="pt"), seconds)  # fmt: skip
            out[f"peer.transformers_audio_row_{name}.audio_s_per_s"] = per_s * secs
        ref = fe(wave30, sampling_rate=16000, return_tensors="np")["audio_input_features"][0]
        out["parity.audio_30s.max_abs_diff_vs_transformers"] = float(np.abs(log_mel(wave30) - ref).max())
    except Exception as e:
        out["peer.feature_extractor_error"] = f"{type(e).__name__}: {e}"[:300]
    return out


def ratios(f: dict) -> dict:
    pairs = {f"crops_dhd{hd}": (f"cpu_stage.image_canvas_dhd{hd}.crops_per_s",
                                f"peer.transformers_image_processor_dhd{hd}.crops_per_s") for hd in HD}  # fmt: skip
    pairs |= {f"image_row_dhd{hd}": (f"cpu_stage.image_row_jpeg_1080p_dhd{hd}.crops_per_s",
                                     f"peer.transformers_image_row_jpeg_1080p_dhd{hd}.crops_per_s") for hd in HD}  # fmt: skip
    pairs["audio_features_30s"] = ("cpu_stage.audio_features_30s.audio_s_per_s",
                                   "peer.transformers_feature_extractor_30s.audio_s_per_s")  # fmt: skip
    for name in ("flac_30s_48k", "mp3_10s"):
        pairs[f"audio_row_{name}"] = (f"cpu_stage.audio_row_{name}.audio_s_per_s",
                                      f"peer.transformers_audio_row_{name}.audio_s_per_s")  # fmt: skip
    return {f"ratio.{k}": f[a] / f[b] for k, (a, b) in pairs.items() if a in f and b in f}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="Time per measurement.")
    parser.add_argument("--engine-ms-per-row", type=float, default=50.0,
                        help="Engine time per row to weigh the GPU actor's media CPU time against.")  # fmt: skip
    parser.add_argument(
        "--engine", action="store_true", help="Also time vLLM's input processing (needs vLLM)."
    )
    parser.add_argument("--out", help="JSON path (default bench/results/preprocess-<host>.json).")
    args = parser.parse_args(argv)
    inputs = make_inputs()
    figures = {}
    figures.update(bench_cpu_stage(inputs, args.seconds))
    figures.update(bench_gpu_actor(inputs, args.seconds, args.engine_ms_per_row))
    if args.engine:
        figures.update(bench_vllm_input_processing(inputs, args.seconds))
    figures.update(bench_peer(inputs, args.seconds))
    figures.update(ratios(figures))
    write_report("preprocess", figures, args.out, threads=1, engine_ms_per_row=args.engine_ms_per_row,
                 cpu=platform.processor() or platform.machine())  # fmt: skip


if __name__ == "__main__":
    main()
