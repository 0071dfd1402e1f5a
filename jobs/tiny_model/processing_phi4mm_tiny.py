"""HF-style processor of phi4mm-batch's tiny Phi-4-multimodal checkpoint (remote code, copied into it).

Written from what vLLM's Phi4MMForCausalLM / Phi4MMMultiModalProcessor expect
(vllm/model_executor/models/phi4mm.py, vLLM 0.32); not Microsoft's file.

vLLM needs:
  processor.image_processor.dynamic_hd               (max number of 448x448 HD crops)
  processor.image_processor.find_closest_aspect_ratio(...)
  processor.audio_processor.sampling_rate            (16000)
  processor(text=..., images=[PIL...], audios=[(np.ndarray, sr), ...], return_tensors="pt")
    -> input_image_embeds  (n_img, max_crops, 3, 448, 448)   crop 0 = global view
       image_sizes         (n_img, 2)  = [target_h, target_w] (multiples of 448)
       image_attention_mask(n_img, max_crops, 32, 32)        1 = real (non-padding) patch
       input_audio_embeds  (n_aud, T_max, 80)  log-mel frames, T = (len-400)//160 + 1
       audio_embed_sizes   (n_aud,)
The token counts vLLM computes must match what the vision/audio towers emit, so the
resize/pad/mask logic below mirrors Phi4MMProcessingInfo._compute_num_image_tokens.
"""

import json
import math
import os

import numpy as np
import torch
from transformers import AutoTokenizer, BatchFeature, ProcessorMixin

VIT_SIZE = 448
VIT_PATCH = 14
MASK_SIZE = VIT_SIZE // VIT_PATCH  # 32
N_MELS = 80
WIN = 400
HOP = 160
N_FFT = 512


def _to_pil(img):
    from PIL import Image

    if isinstance(img, Image.Image):
        return img.convert("RGB")
    if isinstance(img, torch.Tensor):
        img = img.detach().cpu().numpy()
    arr = np.asarray(img)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return Image.fromarray(arr).convert("RGB")


class Phi4MMTinyImageProcessor:
    model_input_names = ["input_image_embeds", "image_sizes", "image_attention_mask"]

    def __init__(self, dynamic_hd=1, **kwargs):
        self.dynamic_hd = int(dynamic_hd)

    @staticmethod
    def find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
        best_ratio_diff = float("inf")
        best_ratio = (1, 1)
        area = width * height
        for ratio in target_ratios:
            target_aspect_ratio = ratio[0] / ratio[1]
            ratio_diff = abs(aspect_ratio - target_aspect_ratio)
            if ratio_diff < best_ratio_diff:
                best_ratio_diff = ratio_diff
                best_ratio = ratio
            elif ratio_diff == best_ratio_diff:
                if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                    best_ratio = ratio
        return best_ratio

    def _target(self, w, h, max_num, min_num=1):
        w_crop = math.ceil(w / VIT_SIZE)
        h_crop = math.ceil(h / VIT_SIZE)
        if w_crop * h_crop > max_num:
            ratios = sorted(
                {
                    (i, j)
                    for i in range(1, max_num + 1)
                    for j in range(1, max_num + 1)
                    if min_num <= i * j <= max_num
                },
                key=lambda x: x[0] * x[1],
            )
            ar = self.find_closest_aspect_ratio(w / h, ratios, w, h, VIT_SIZE)
            return VIT_SIZE * ar[0], VIT_SIZE * ar[1]
        return VIT_SIZE * w_crop, VIT_SIZE * h_crop

    @staticmethod
    def _normalize(pil):
        a = np.asarray(pil, dtype=np.float32) / 255.0
        a = (a - 0.5) / 0.5
        return torch.from_numpy(a.transpose(2, 0, 1).copy())

    def __call__(self, images, dynamic_hd=None, **kwargs):
        from PIL import Image

        max_num = int(dynamic_hd or self.dynamic_hd)
        crops_all, masks_all, sizes = [], [], []
        for img in images:
            pil = _to_pil(img)
            w, h = pil.size
            tw, th = self._target(w, h, max_num)
            rw, rh = tw / w, th / h
            if rw < rh:
                nw, nh = tw, int(h * rw)
            else:
                nw, nh = int(w * rh), th
            canvas = Image.new("RGB", (tw, th), (255, 255, 255))
            canvas.paste(pil.resize((max(nw, 1), max(nh, 1)), Image.BICUBIC), (0, 0))
            pad_h, pad_w = th - nh, tw - nw
            # valid-patch mask at patch resolution (same rule as vLLM's token count)
            fw, fh = tw // VIT_PATCH, th // VIT_PATCH
            vw = fw - (pad_w // VIT_PATCH if pad_w >= VIT_PATCH else 0)
            vh = fh - (pad_h // VIT_PATCH if pad_h >= VIT_PATCH else 0)
            full_mask = torch.zeros(fh, fw, dtype=torch.long)
            full_mask[:vh, :vw] = 1
            nh_c, nw_c = th // VIT_SIZE, tw // VIT_SIZE
            crops = [self._normalize(canvas.resize((VIT_SIZE, VIT_SIZE), Image.BICUBIC))]
            masks = [torch.ones(MASK_SIZE, MASK_SIZE, dtype=torch.long)]
            t = self._normalize(canvas)
            for i in range(nh_c):
                for j in range(nw_c):
                    crops.append(t[:, i * VIT_SIZE : (i + 1) * VIT_SIZE, j * VIT_SIZE : (j + 1) * VIT_SIZE])
                    masks.append(
                        full_mask[i * MASK_SIZE : (i + 1) * MASK_SIZE, j * MASK_SIZE : (j + 1) * MASK_SIZE]
                    )
            crops_all.append(torch.stack(crops))
            masks_all.append(torch.stack(masks))
            sizes.append([th, tw])
        max_c = max(c.shape[0] for c in crops_all)
        pix = torch.zeros(len(crops_all), max_c, 3, VIT_SIZE, VIT_SIZE)
        msk = torch.zeros(len(crops_all), max_c, MASK_SIZE, MASK_SIZE, dtype=torch.long)
        for k, (c, m) in enumerate(zip(crops_all, masks_all, strict=True)):
            pix[k, : c.shape[0]] = c
            msk[k, : m.shape[0]] = m
        return {
            "input_image_embeds": pix,
            "image_sizes": torch.tensor(sizes, dtype=torch.long),
            "image_attention_mask": msk,
        }


def _mel_filters(sr=16000, n_fft=N_FFT, n_mels=N_MELS):
    def hz2mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def mel2hz(m):
        return 700.0 * (10 ** (m / 2595.0) - 1.0)

    mels = np.linspace(hz2mel(0), hz2mel(sr / 2), n_mels + 2)
    bins = np.floor((n_fft + 1) * mel2hz(mels) / sr).astype(int)
    fb = np.zeros((n_mels, n_fft // 2 + 1), dtype=np.float32)
    for m in range(1, n_mels + 1):
        left, c, r = bins[m - 1], bins[m], bins[m + 1]
        for k in range(left, c):
            fb[m - 1, k] = (k - left) / max(c - left, 1)
        for k in range(c, r):
            fb[m - 1, k] = (r - k) / max(r - c, 1)
    return fb


class Phi4MMTinyAudioProcessor:
    model_input_names = ["input_audio_embeds", "audio_embed_sizes"]

    def __init__(self, sampling_rate=16000, compression_rate=8, **kwargs):
        self.sampling_rate = int(sampling_rate)
        self.compression_rate = int(compression_rate)
        self.feature_size = N_MELS
        self._fb = _mel_filters(self.sampling_rate)
        self._win = np.hamming(WIN).astype(np.float32)

    def extract(self, wav):
        wav = np.asarray(wav, dtype=np.float32).reshape(-1)
        n = (len(wav) - WIN) // HOP + 1
        if n < 1:
            raise ValueError("audio too short")
        idx = np.arange(WIN)[None, :] + HOP * np.arange(n)[:, None]
        frames = wav[idx] * self._win
        spec = np.abs(np.fft.rfft(frames, n=N_FFT)) ** 2
        return np.log(np.clip(spec @ self._fb.T, 1e-10, None)).astype(np.float32)  # (n, 80)

    def __call__(self, audios, **kwargs):
        feats = []
        for a in audios:
            wav, sr = a if isinstance(a, (tuple, list)) else (a, self.sampling_rate)
            if sr != self.sampling_rate:
                raise ValueError(f"expected {self.sampling_rate} Hz audio, got {sr}")
            feats.append(torch.from_numpy(self.extract(wav)))
        T = max(f.shape[0] for f in feats)
        out = torch.zeros(len(feats), T, N_MELS)
        for k, f in enumerate(feats):
            out[k, : f.shape[0]] = f
        sizes = torch.tensor([math.ceil(f.shape[0] / self.compression_rate) for f in feats])
        return {"input_audio_embeds": out, "audio_embed_sizes": sizes, "audio_attention_mask": None}


class Phi4MMTinyProcessor(ProcessorMixin):
    """Bundles tokenizer + image processor + audio processor (no ProcessorMixin loading magic)."""

    def __init__(self, image_processor, audio_processor, tokenizer, chat_template=None):
        # deliberately not calling ProcessorMixin.__init__ (its attribute checks want registered classes)
        self.image_processor = image_processor
        self.audio_processor = audio_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template

    @classmethod
    def from_pretrained(cls, path, tokenizer=None, dynamic_hd=None, **kwargs):
        cfg_file = os.path.join(path, "processor_config.json")
        cfg = json.load(open(cfg_file)) if os.path.exists(cfg_file) else {}
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(path)
        ip = Phi4MMTinyImageProcessor(dynamic_hd=dynamic_hd or cfg.get("dynamic_hd", 1))
        ap = Phi4MMTinyAudioProcessor(
            sampling_rate=cfg.get("audio_sampling_rate", 16000),
            compression_rate=cfg.get("audio_compression_rate", 8),
        )
        return cls(ip, ap, tokenizer, chat_template=getattr(tokenizer, "chat_template", None))

    def __repr__(self):
        return f"Phi4MMTinyProcessor(dynamic_hd={self.image_processor.dynamic_hd})"

    def __call__(
        self, text=None, images=None, audios=None, audio=None, return_tensors="pt", dynamic_hd=None, **kwargs
    ):
        audios = audios if audios is not None else audio
        data = {}
        if images:
            data.update(self.image_processor(images, dynamic_hd=dynamic_hd))
        else:
            # vLLM's Phi4MM postprocessing always reads image_sizes, even for audio-only calls
            data.update(
                {
                    "input_image_embeds": torch.zeros(0, 1, 3, VIT_SIZE, VIT_SIZE),
                    "image_sizes": torch.zeros(0, 2, dtype=torch.long),
                    "image_attention_mask": torch.zeros(0, 1, MASK_SIZE, MASK_SIZE, dtype=torch.long),
                }
            )
        if audios:
            a = self.audio_processor(audios)
            a.pop("audio_attention_mask")
            data.update(a)
        if text is not None:
            enc = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")
            data["input_ids"] = enc["input_ids"]
            data["attention_mask"] = enc["attention_mask"]
        return BatchFeature(data)
