"""HF-style processor of phi4mm-batch's tiny Phi-4-multimodal checkpoint (remote code, copied into it).

Written from what vLLM's Phi4MMForCausalLM / Phi4MMMultiModalProcessor expect
(vllm/model_executor/models/phi4mm.py, vLLM 0.32); not Microsoft's file, but the same arithmetic as its
processor (bilinear resize, white padding, bicubic global view; pre-emphasised log-mel on a Kaldi
filterbank), so the engine's own media processing can be compared with phi4mm-batch's CPU stage.

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
from transformers import BatchFeature, PreTrainedTokenizerFast, ProcessorMixin

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
        # torchvision's ToTensor + Normalize((0.5,) * 3, (0.5,) * 3), in the same order of operations
        t = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float().div(255)
        return t.sub(0.5).div(0.5)

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
            if min(nw, nh) < 10:
                raise ValueError(f"the aspect ratio is very extreme {(nw, nh)}")
            # the original: torchvision resize of the PIL image (bilinear), white padding right/bottom
            canvas = Image.new("RGB", (tw, th), (255, 255, 255))
            canvas.paste(pil.resize((nw, nh), Image.BILINEAR), (0, 0))
            pad_h, pad_w = th - nh, tw - nw
            fw, fh = tw // VIT_PATCH, th // VIT_PATCH
            full_mask = torch.ones(fh, fw, dtype=torch.long)
            if pad_w >= VIT_PATCH:
                full_mask[:, fw - pad_w // VIT_PATCH :] = 0
            if pad_h >= VIT_PATCH:
                full_mask[fh - pad_h // VIT_PATCH :, :] = 0
            nh_c, nw_c = th // VIT_SIZE, tw // VIT_SIZE
            t = self._normalize(canvas)
            # global view: bicubic interpolation of the normalized canvas, no antialiasing
            crops = [torch.nn.functional.interpolate(t[None], size=(VIT_SIZE, VIT_SIZE), mode="bicubic")[0]]
            masks = [torch.ones(MASK_SIZE, MASK_SIZE, dtype=torch.long)]
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


class Phi4MMTinyAudioProcessor:
    """Log-mel features as the original Phi4MMAudioFeatureExtractor computes them (float64 numpy)."""

    model_input_names = ["input_audio_embeds", "audio_embed_sizes"]

    def __init__(self, sampling_rate=16000, compression_rate=8, **kwargs):
        from transformers.audio_utils import mel_filter_bank

        self.sampling_rate = int(sampling_rate)
        self.compression_rate = int(compression_rate)
        self.feature_size = N_MELS
        self._fb = mel_filter_bank(
            num_frequency_bins=N_FFT // 2 + 1, num_mel_filters=N_MELS, min_frequency=0.0, max_frequency=7690.0,
            sampling_rate=self.sampling_rate, triangularize_in_mel_space=True, mel_scale="kaldi",
        )  # fmt: skip
        self._win = np.hamming(WIN)

    def extract(self, wav):
        wav = np.asarray(wav, dtype=np.float32).reshape(-1)
        n = (len(wav) - WIN) // HOP + 1
        if n < 1:
            raise ValueError("audio too short")
        frames = np.array([wav[s : s + WIN] for s in range(0, HOP * n, HOP)], dtype=np.float32)
        prev = np.roll(frames, 1, axis=1)
        prev[:, 0] = prev[:, 1]
        frames = (frames - 0.97 * prev) * 32768
        spec = np.abs(np.fft.rfft(self._win * frames, n=N_FFT, axis=1).astype(np.complex64)).astype(
            np.float32
        )
        return np.log(np.clip((spec**2).dot(self._fb), 1.0, None)).astype(np.float32)  # (n, 80)

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
            # Not AutoTokenizer: it reads config.json without remote code, and transformers' generic config
            # cannot parse the full-size checkpoint's LongRoPE settings. The tokenizer is always this class.
            tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
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
