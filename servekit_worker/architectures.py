"""Model definitions and their input pipelines, shipped inside every archive with the rest of servekit_worker.

servekit's trainers and the serving workers build models, tokenize text and transform images with this same code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

TORCHVISION_PREFIX = "torchvision:"


class SimpleCNN(nn.Module):
    """The original design's digit classifier: 1x28x28 in, 10 logits out."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3),
            nn.ReLU(),
            nn.Conv2d(32, 64, kernel_size=3),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 12 * 12, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SmallCNN(nn.Module):
    """A distillation student for SimpleCNN: 8 and 16 channels, fc 32 (about 40x fewer weights)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, kernel_size=3), nn.ReLU(), nn.Conv2d(8, 16, kernel_size=3), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 12 * 12, 32), nn.ReLU(), nn.Linear(32, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class TextClassifier(nn.Module):
    """A small Transformer encoder over token ids (0 = padding, position 0 = the class token)."""

    def __init__(
        self, vocab_size: int, num_classes: int, dim: int = 128, heads: int = 4, layers: int = 2, max_tokens: int = 64
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=Tokenizer.PAD)
        self.position = nn.Embedding(max_tokens, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        hidden = self.embed(ids) + self.position(positions)
        hidden = self.encoder(hidden, src_key_padding_mask=ids == Tokenizer.PAD)
        return self.head(hidden[:, 0])


def build_model(model_class: str, model_kwargs: dict | None = None, code_dir: Path | None = None) -> nn.Module:
    """A class of this file by name, a torchvision model as `torchvision:resnet18` (random init, no download), or a
    user's class or factory as `module:attribute` (imported from `code_dir` when the model's code travels with it,
    else from the installed packages)."""
    kwargs = dict(model_kwargs or {})
    if model_class.startswith(TORCHVISION_PREFIX):
        import torchvision

        return torchvision.models.get_model(model_class.removeprefix(TORCHVISION_PREFIX), weights=None, **kwargs)
    if ":" in model_class:
        return user_callable(model_class, code_dir)(**kwargs)
    factory = {"SimpleCNN": SimpleCNN, "SmallCNN": SmallCNN, "TextClassifier": TextClassifier}.get(model_class)
    if factory is None:
        raise ValueError(
            f"unknown model class {model_class!r}: use SimpleCNN, SmallCNN, TextClassifier, torchvision:NAME or "
            "module:Class (servekit import)"
        )
    return factory(**kwargs)


def user_callable(spec: str, code_dir: Path | None = None):
    """`module:attribute` (attribute may be dotted), the module imported from `code_dir` when given."""
    module_name, _, attribute = spec.partition(":")
    module = import_from(module_name, code_dir)
    value = module
    for part in attribute.split("."):
        value = getattr(value, part)
    return value


def import_from(module_name: str, code_dir: Path | None):
    """Imports `module_name`, from `code_dir` first when given. Modules of the same top-level names already imported
    from elsewhere (another model's code of the same file names, or the user's working copy) are dropped first, so
    the code that runs is the copy in `code_dir`."""
    import importlib
    import sys

    if code_dir is not None:
        root = str(Path(code_dir).resolve())
        own = {path.stem for path in Path(root).iterdir() if path.suffix == ".py" or (path / "__init__.py").is_file()}
        for name in [name for name in sys.modules if name.split(".")[0] in own]:
            file = getattr(sys.modules[name], "__file__", None) or ""
            if not file.startswith(root + "/"):
                del sys.modules[name]
        if root in sys.path:
            sys.path.remove(root)
        sys.path.insert(0, root)
        importlib.invalidate_caches()
    return importlib.import_module(module_name)


class Tokenizer:
    """Lower-cased words, numbers and punctuation; ids from a vocabulary saved beside the weights."""

    PAD, UNK, CLS = 0, 1, 2
    SPECIALS = ("<pad>", "<unk>", "<cls>")
    PATTERN = re.compile(r"[a-z0-9']+|[^\sa-z0-9']")

    def __init__(self, vocabulary: list[str]):
        if tuple(vocabulary[:3]) != self.SPECIALS:
            raise ValueError(f"a vocabulary starts with {self.SPECIALS}")
        self.vocabulary = vocabulary
        self.ids = {token: i for i, token in enumerate(vocabulary)}

    @classmethod
    def from_texts(cls, texts: list[str]) -> Tokenizer:
        words = sorted({token for text in texts for token in cls.split(text)})
        return cls([*cls.SPECIALS, *words])

    @classmethod
    def load(cls, path: Path) -> Tokenizer:
        return cls(json.loads(Path(path).read_text()))

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.vocabulary))

    @classmethod
    def split(cls, text: str) -> list[str]:
        return cls.PATTERN.findall(text.lower())

    def encode(self, text: str) -> list[int]:
        """The class token, then one id per token (unknown words -> <unk>)."""
        return [self.CLS, *(self.ids.get(token, self.UNK) for token in self.split(text))]


def pad_batch(sequences: list[list[int]]) -> torch.Tensor:
    """Token id lists -> a (batch, longest) int64 tensor padded with PAD."""
    batch = torch.full((len(sequences), max(len(s) for s in sequences)), Tokenizer.PAD, dtype=torch.int64)
    for row, sequence in enumerate(sequences):
        batch[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.int64)
    return batch


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_transform(resize: int = 256, crop: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """uint8 CxHxW (RGB) -> normalized float32 3 x crop x crop, with torchvision transforms v2."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.Resize(resize, antialias=True),
            v2.CenterCrop(crop),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )
