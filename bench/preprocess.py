"""Preprocessing throughput per CPU core (one thread), written to bench/results/preprocess-<host>.json.

    python -m bench.preprocess [--seconds S] [--engine] [--out PATH]

Inputs: a 1920x1080 and a 4032x3024 JPEG (a real photo, upscaled), a 30 s 48 kHz FLAC and a 10 s MP3
(real speech).
Figures (throughput ones from interleaved rounds, the median of 5; see ``rates``):
- cpu_stage.*: phi4mm-batch's CPU actors. ``image_canvas_dhd{4,16}``: the model's image input from a
  decoded picture (resize into the crop grid + pad, masks, token count), as crops/s and images/s;
  ``image_row_*``: the same from the JPEG's bytes, as the CPU stage hands it on (decode, EXIF, RGB,
  bytes, cache key); ``image_row_jpeg_12mp*``: a 4032x3024 camera-size JPEG, exact and with
  ``media.fast_jpeg_decode``. ``audio_features_30s``: log-mel features of a 16 kHz clip; ``audio_row_*``: decode
  + mono + resample to 16 kHz + features + cache key, from the file's bytes.
- gpu_actor.*: media work left in the GPU actor's process per row: turning a prepared Arrow batch into
  the engine's prompts and tensors (zero-copy views), and finishing the canvas into normalized crops and
  the global view (``actors.media.features.crops_from_canvas``; on a GPU it runs on the device, and its CPU
  time is the launching). ``cpu_share_of_row`` weighs the CPU time against --engine-ms-per-row. With
  --engine (vLLM installed): the CPU time of vLLM's own input processing per request
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
    camera = io.BytesIO()  # a 12 MP phone photo's size
    Image.open(MEDIA / "coffee.jpg").convert("RGB").resize((4032, 3024), Image.BICUBIC).save(
        camera, format="JPEG", quality=90
    )
    speech, rate = sf.read(MEDIA / "fox.wav", dtype="float32")  # 16 kHz speech, 3.4 s
    at48 = resample_poly(speech, 3, 1).astype(np.float32)
    long48 = np.tile(at48, int(np.ceil(30 * 48000 / len(at48))))[: 30 * 48000]
    flac = io.BytesIO()
    sf.write(flac, long48, 48000, format="FLAC")
    mp3_src = np.tile(speech, int(np.ceil(10 * rate / len(speech))))[: 10 * rate]
    mp3 = io.BytesIO()
    sf.write(mp3, mp3_src, rate, format="MP3")
    return {
        "jpeg_1080p": jpeg.getvalue(),
        "jpeg_12mp": camera.getvalue(),
        "flac_30s_48k": flac.getvalue(),
        "mp3_10s": mp3.getvalue(),
    }


def rates(workloads: dict, seconds: float, rounds: int = 5) -> dict[str, float]:
    """Calls per second of each workload. The workloads take turns, ``rounds`` times, and each figure is
    the median over its rounds: load that drifts on a shared host hits ours and the peer's alike."""
    import statistics

    samples: dict[str, list[float]] = {name: [] for name in workloads}
    for fn in workloads.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in workloads.items():
            n, started = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - started) < seconds / rounds or n < 2:
                fn()
                n += 1
            samples[name].append(n / elapsed)
    return {name: statistics.median(values) for name, values in samples.items()}


def cpu_ms(fn, seconds: float) -> float:
    """Process CPU milliseconds per call of fn."""
    fn()
    n, wall, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - wall < seconds or n < 3:
        fn()
        n += 1
    return (time.process_time() - cpu) * 1000 / n


def _audio_seconds(data: bytes) -> float:
    from actors.media.decode import decode_audio

    return decode_audio(data, "bench", 0.025, 3600).seconds


def cpu_stage_workloads(inputs) -> dict[str, tuple]:
    """name -> (call, units per call, unit) for the CPU stage's throughput figures."""
    from actors.media.decode import decode_audio, decode_image
    from actors.media.features import image_canvas, log_mel
    from actors.preprocess import prepared_audio, prepared_image
    from actors.tokens import fitted_size

    jpeg = inputs["jpeg_1080p"]
    picture = decode_image(jpeg, "bench", NO_LIMIT).image
    out = {}
    for hd in HD:
        crops = image_canvas(picture, hd).crops
        out[f"cpu_stage.image_canvas_dhd{hd}"] = (lambda hd=hd: image_canvas(picture, hd), crops, "crops")
        out[f"cpu_stage.image_row_jpeg_1080p_dhd{hd}"] = (
            lambda hd=hd: prepared_image(decode_image(jpeg, "bench", NO_LIMIT), hd), crops, "crops")  # fmt: skip
    camera = inputs["jpeg_12mp"]
    for hd in HD:
        crops = image_canvas(decode_image(camera, "bench", NO_LIMIT).image, hd).crops
        reduce_to = lambda w, h, hd=hd: fitted_size(w, h, hd)[1]  # noqa: E731
        out[f"cpu_stage.image_row_jpeg_12mp_dhd{hd}"] = (
            lambda hd=hd: prepared_image(decode_image(camera, "bench", NO_LIMIT), hd), crops, "crops")  # fmt: skip
        out[f"cpu_stage.image_row_jpeg_12mp_fast_decode_dhd{hd}"] = (
            lambda hd=hd, r=reduce_to: prepared_image(decode_image(camera, "bench", NO_LIMIT, r), hd),
            crops, "crops")  # fmt: skip
    wave30 = decode_audio(inputs["flac_30s_48k"], "bench", 0.025, 3600).samples
    out["cpu_stage.audio_features_30s"] = (lambda: log_mel(wave30), 30.0, "audio_s")
    for name in ("flac_30s_48k", "mp3_10s"):
        data = inputs[name]
        out[f"cpu_stage.audio_row_{name}"] = (
            lambda data=data: prepared_audio(decode_audio(data, "bench", 0.025, 3600).samples),
            _audio_seconds(data), "audio_s")  # fmt: skip
    return out


def peer_workloads(inputs) -> tuple[dict[str, tuple], dict]:
    """transformers' Phi4Multimodal processors on the same inputs (same decoder for rows), and parity
    figures: how far our model inputs are from theirs."""
    workloads, parity = {}, {}
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        return {}, {"peer.error": "torch is not installed"}
    from actors.media.decode import decode_audio, decode_image
    from actors.media.features import crops_from_canvas, image_canvas, log_mel

    jpeg, camera = inputs["jpeg_1080p"], inputs["jpeg_12mp"]
    try:
        from transformers import Phi4MultimodalImageProcessorFast

        picture = decode_image(jpeg, "bench", NO_LIMIT).image
        for hd in HD:
            ip = Phi4MultimodalImageProcessorFast(dynamic_hd=hd)
            ref = ip(picture, return_tensors="pt")["image_pixel_values"][0]
            workloads[f"peer.transformers_image_processor_dhd{hd}"] = (
                lambda ip=ip: ip(picture, return_tensors="pt"), ref.shape[0], "crops")  # fmt: skip
            workloads[f"peer.transformers_image_row_jpeg_1080p_dhd{hd}"] = (
                lambda ip=ip: ip(decode_image(jpeg, "bench", NO_LIMIT).image, return_tensors="pt"),
                ref.shape[0], "crops")  # fmt: skip
            crops = ip(decode_image(camera, "bench", NO_LIMIT).image, return_tensors="pt")[
                "image_pixel_values"
            ]
            workloads[f"peer.transformers_image_row_jpeg_12mp_dhd{hd}"] = (
                lambda ip=ip: ip(decode_image(camera, "bench", NO_LIMIT).image, return_tensors="pt"),
                crops.shape[1], "crops")  # fmt: skip
            ours = crops_from_canvas(torch.from_numpy(image_canvas(picture, hd).pixels))
            # transformers resizes a tensor (torchvision, antialiased bilinear), the original a PIL image
            # (PIL bilinear): a little apart on [-1, 1] pixels
            parity[f"parity.image_dhd{hd}.mean_abs_diff_vs_transformers"] = float((ours - ref).abs().mean())
            parity[f"parity.image_dhd{hd}.max_abs_diff_vs_transformers"] = float((ours - ref).abs().max())
    except Exception as e:  # torchvision missing (CPU torch here), or an API change
        parity["peer.image_processor_error"] = f"{type(e).__name__}: {e}"[:300]
    try:
        from transformers import Phi4MultimodalFeatureExtractor

        fe = Phi4MultimodalFeatureExtractor()
        wave30 = decode_audio(inputs["flac_30s_48k"], "bench", 0.025, 3600).samples
        workloads["peer.transformers_feature_extractor_30s"] = (
            lambda: fe(wave30, sampling_rate=16000, return_tensors="pt"), 30.0, "audio_s")  # fmt: skip
        for name in ("flac_30s_48k", "mp3_10s"):
            data = inputs[name]
            workloads[f"peer.transformers_audio_row_{name}"] = (
                lambda data=data: fe(decode_audio(data, "bench", 0.025, 3600).samples, sampling_rate=16000,
                                     return_tensors="pt"), _audio_seconds(data), "audio_s")  # fmt: skip
        ref = fe(wave30, sampling_rate=16000, return_tensors="np")["audio_input_features"][0]
        parity["parity.audio_30s.max_abs_diff_vs_transformers"] = float(np.abs(log_mel(wave30) - ref).max())
    except Exception as e:
        parity["peer.feature_extractor_error"] = f"{type(e).__name__}: {e}"[:300]
    return workloads, parity


def throughput(inputs, seconds) -> dict:
    workloads = cpu_stage_workloads(inputs)
    peer, parity = peer_workloads(inputs)
    workloads |= peer
    per_s = rates({name: fn for name, (fn, _, _) in workloads.items()}, seconds)
    out = {}
    for name, (_, units, unit) in workloads.items():
        out[f"{name}.{unit}_per_s"] = per_s[name] * units
        if unit == "crops":
            out[f"{name}.images_per_s"] = per_s[name]
    return out | parity


def bench_gpu_actor(inputs, seconds, engine_ms_per_row: float) -> dict:
    """Media CPU time per row in the GPU actor's process, outside vLLM."""
    import pyarrow as pa
    import torch

    from actors.engines.contract import EngineRequest
    from actors.engines.vllm.engine import engine_prompt
    from actors.generate import prepared_rows
    from actors.media.decode import decode_audio, decode_image
    from actors.media.features import crops_from_canvas, image_canvas
    from actors.preprocess import prepared_audio, prepared_image
    from schemas.rows import PREPARED_SCHEMA, empty_prepared_row

    def arrow_to_requests_ms(rows: list[dict]) -> float:
        """CPU ms per row from a prepared Arrow batch (8 rows) to the engine's prompts with tensors."""
        batch = pa.Table.from_pylist(rows * 8, schema=PREPARED_SCHEMA)

        def build():
            return [
                engine_prompt(r) for row in prepared_rows(batch) for r in EngineRequest.from_prepared(row)
            ]

        return cpu_ms(build, seconds) / batch.num_rows

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = {"gpu_actor.device": device}
    decoded = decode_image(inputs["jpeg_1080p"], "bench", NO_LIMIT)
    picture = decoded.image
    for hd in HD:
        canvas = image_canvas(picture, hd)
        row = empty_prepared_row("r") | {"prompt": "<|user|><|image_1|>x<|end|><|assistant|>",
                                          "images": [prepared_image(decoded, hd)]}  # fmt: skip
        build = arrow_to_requests_ms([row])
        on_device = torch.from_numpy(canvas.pixels).to(device)

        def finish(c=on_device):
            crops = crops_from_canvas(c)
            if device == "cuda":
                torch.cuda.synchronize()
            return crops

        finish_ms = cpu_ms(finish, seconds)
        on_cpu = crops_from_canvas(torch.from_numpy(canvas.pixels))
        out[f"parity.canvas_finish_dhd{hd}.max_abs_diff_{device}_vs_cpu"] = float(
            (finish().cpu() - on_cpu).abs().max()
        )
        media_ms = build + finish_ms
        out[f"gpu_actor.image_dhd{hd}.request_build_cpu_ms"] = build
        out[f"gpu_actor.image_dhd{hd}.canvas_finish_cpu_ms"] = finish_ms
        out[f"gpu_actor.image_dhd{hd}.cpu_share_of_row"] = media_ms / (media_ms + engine_ms_per_row)
    wave = decode_audio(inputs["flac_30s_48k"], "bench", 0.025, 3600).samples
    row = empty_prepared_row("r") | {"prompt": "<|user|><|audio_1|>x<|end|><|assistant|>",
                                      "audios": [prepared_audio(wave)]}  # fmt: skip
    build = arrow_to_requests_ms([row])
    out["gpu_actor.audio_30s.request_build_cpu_ms"] = build
    out["gpu_actor.audio_30s.cpu_share_of_row"] = build / (build + engine_ms_per_row)
    return out


def bench_vllm_input_processing(inputs, seconds, engine_ms_per_row: float) -> dict:
    """CPU ms of LLMEngine.add_request per request: prepared inputs vs raw media (the checkpoint processor
    inside vLLM), on the tiny checkpoint, dynamic_hd 16."""
    import tempfile

    import pyarrow as pa

    # as in a GPU actor (engine.executor: uni): the engine core in this process, so its CPU time is ours
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from actors.engines.contract import EngineRequest
    from actors.engines.vllm.engine import Engine, engine_prompt
    from actors.generate import run_init_hook
    from actors.media.decode import decode_audio, decode_image
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
    run_init_hook(config.engine.init_hook)
    engine = Engine(config)
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

    def add_ms(make_prompt) -> float:
        """CPU ms of add_request, each call with an empty media cache (rows rarely repeat media)."""
        total, n, started = 0.0, 0, time.perf_counter()
        while time.perf_counter() - started < seconds or n < 3:
            llm_engine.reset_mm_cache()
            prompt, request_id = make_prompt(), f"bench-{next(counter)}"
            cpu = time.process_time()
            llm_engine.add_request(request_id, prompt, params)
            total += time.process_time() - cpu
            llm_engine.abort_request([request_id])
            n += 1
        return total * 1000 / n

    out = {}
    for name, row, raw in (("image_dhd16", img_row, {"image": raw_image}),
                           ("audio_30s", aud_row, {"audio": (raw_audio, 16000)})):  # fmt: skip
        (request,) = EngineRequest.from_prepared(row)
        prepared_ms = add_ms(lambda r=request: engine_prompt(r))
        out[f"gpu_actor.vllm_input_processing_{name}.prepared_cpu_ms"] = prepared_ms
        out[f"gpu_actor.vllm_input_processing_{name}.raw_media_cpu_ms"] = add_ms(
            lambda p=row["prompt"], mm=raw: {"prompt": p, "multi_modal_data": mm}
        )
        out[f"gpu_actor.vllm_input_processing_{name}.prepared_cpu_share_of_row"] = prepared_ms / (
            prepared_ms + engine_ms_per_row
        )
    return out


def ratios(f: dict) -> dict:
    pairs = {f"crops_dhd{hd}": (f"cpu_stage.image_canvas_dhd{hd}.crops_per_s",
                                f"peer.transformers_image_processor_dhd{hd}.crops_per_s") for hd in HD}  # fmt: skip
    pairs |= {f"image_row_dhd{hd}": (f"cpu_stage.image_row_jpeg_1080p_dhd{hd}.crops_per_s",
                                     f"peer.transformers_image_row_jpeg_1080p_dhd{hd}.crops_per_s") for hd in HD}  # fmt: skip
    pairs |= {f"image_row_12mp_dhd{hd}": (f"cpu_stage.image_row_jpeg_12mp_dhd{hd}.crops_per_s",
                                          f"peer.transformers_image_row_jpeg_12mp_dhd{hd}.crops_per_s") for hd in HD}  # fmt: skip
    pairs |= {f"image_row_12mp_fast_decode_dhd{hd}": (f"cpu_stage.image_row_jpeg_12mp_fast_decode_dhd{hd}.crops_per_s",
                                                      f"peer.transformers_image_row_jpeg_12mp_dhd{hd}.crops_per_s") for hd in HD}  # fmt: skip
    pairs["audio_features_30s"] = ("cpu_stage.audio_features_30s.audio_s_per_s",
                                   "peer.transformers_feature_extractor_30s.audio_s_per_s")  # fmt: skip
    for name in ("flac_30s_48k", "mp3_10s"):
        pairs[f"audio_row_{name}"] = (f"cpu_stage.audio_row_{name}.audio_s_per_s",
                                      f"peer.transformers_audio_row_{name}.audio_s_per_s")  # fmt: skip
    return {f"ratio.{k}": f[a] / f[b] for k, (a, b) in pairs.items() if a in f and b in f}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="Time per figure (spread over 5 rounds).")
    parser.add_argument("--engine-ms-per-row", type=float, default=50.0,
                        help="Engine time per row to weigh the GPU actor's media CPU time against.")  # fmt: skip
    parser.add_argument(
        "--engine", action="store_true", help="Also time vLLM's input processing (needs vLLM)."
    )
    parser.add_argument("--out", help="JSON path (default bench/results/preprocess-<host>.json).")
    args = parser.parse_args(argv)
    inputs = make_inputs()
    figures = throughput(inputs, args.seconds)
    figures.update(bench_gpu_actor(inputs, args.seconds, args.engine_ms_per_row))
    if args.engine:
        figures.update(bench_vllm_input_processing(inputs, args.seconds, args.engine_ms_per_row))
    figures.update(ratios(figures))
    write_report("preprocess", figures, args.out, threads=1, engine_ms_per_row=args.engine_ms_per_row,
                 cpu=platform.processor() or platform.machine())  # fmt: skip


if __name__ == "__main__":
    main()
