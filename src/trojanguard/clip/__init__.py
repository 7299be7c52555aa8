"""Image–text (CLIP-style) models for the zoo and the image–text defences (UBT, CleanCLIP): a tiny CLIP with its own
word tokenizer, its contrastive loss and trainer, and the digits' captions and zero-shot prompts. Real models
(open_clip, Hugging Face ``CLIPModel``) enter through :class:`~trojanguard.models.ImageText`."""

from trojanguard.clip.model import (
    CAPTION_TEMPLATES,
    DIGIT_NAMES,
    PROMPT_TEMPLATE,
    CLIPTrainConfig,
    TinyCLIP,
    class_prompt_tokens,
    clip_loss,
    digit_captions,
    digit_tokenizer,
    train_clip,
)
from trojanguard.clip.tokenizer import WordTokenizer

__all__ = ["CAPTION_TEMPLATES", "DIGIT_NAMES", "PROMPT_TEMPLATE", "CLIPTrainConfig", "TinyCLIP", "WordTokenizer",
           "class_prompt_tokens", "clip_loss", "digit_captions", "digit_tokenizer", "train_clip"]
