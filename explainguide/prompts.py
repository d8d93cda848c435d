"""The CoOp prompt learner: learned context vectors placed around each class name's tokens.

Every prompt is tokenised as "X X ... X <class name>." (n_ctx placeholders), so class-name spans come from
the tokenizer. The learner reorders positions for the class token position and swaps placeholders for ctx.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from explainguide.explain.tokens import tokenize
from explainguide.models.towers import encode_text_embeddings, text_tower, token_embeddings

CLASS_POSITIONS = ("end", "middle", "front")


def _position_order(n_ctx: int, n_name: int, length: int, position: str) -> list[int]:
    """For each output slot, the slot of the source prompt [SOT, ctx*n_ctx, name*n_name, rest...] it takes."""
    ctx = list(range(1, 1 + n_ctx))
    name = list(range(1 + n_ctx, 1 + n_ctx + n_name))
    rest = list(range(1 + n_ctx + n_name, length))
    half = n_ctx // 2
    body = {"end": ctx + name, "front": name + ctx, "middle": ctx[:half] + name + ctx[half:]}[position]
    return [0] + body + rest


class PromptLearner(nn.Module):
    """Learned context for C class names.

    forward() -> prompt embeddings (C, L, width). Buffers: token_ids (C, L) in the assembled order (EOT =
    argmax), class_mask (C, L) bool on the class-name tokens. ctx is (n_ctx, width), or (C, n_ctx, width)
    when class_specific.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        context_length: int,
        classnames: list[str],
        n_ctx: int = 16,
        ctx_init: str | None = None,
        class_token_position: str = "end",
        class_specific: bool = False,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if class_token_position not in CLASS_POSITIONS:
            raise ValueError(f"task.class_token_position={class_token_position!r}; use one of {CLASS_POSITIONS}")
        classnames = [name.replace("_", " ") for name in classnames]
        embed = token_embeddings(model, torch.zeros(1, 1, dtype=torch.long, device=model.logit_scale.device))
        width, dtype = embed.shape[-1], embed.dtype
        if ctx_init:
            init_ids = tokenize(tokenizer, [ctx_init], context_length)
            n_init = int(init_ids.argmax(dim=-1)) - 1
            if n_ctx and n_ctx != n_init:
                raise ValueError(
                    f"task.n_ctx={n_ctx} but task.ctx_init={ctx_init!r} has {n_init} tokens; set task.n_ctx={n_init} "
                    "(or null)"
                )
            n_ctx = n_init
            with torch.no_grad():
                init = token_embeddings(model, init_ids.to(embed.device))[0, 1 : 1 + n_ctx].float()
            placeholder = ctx_init
        elif not n_ctx:
            raise ValueError("task.n_ctx is null and task.ctx_init is empty: give task.n_ctx (e.g. 16) or task.ctx_init "
                             "(e.g. 'a photo of a'; n_ctx then follows its token count)")
        else:
            # Class-specific random contexts are drawn independently per class, as CoOp's CSC does.
            shape = (len(classnames), n_ctx, width) if class_specific else (n_ctx, width)
            init = torch.randn(*shape) * init_std
            placeholder = " ".join(["X"] * n_ctx)
        if class_specific and init.dim() == 2:
            init = init.unsqueeze(0).repeat(len(classnames), 1, 1)  # from words: every class starts from them
        self.ctx = nn.Parameter(init.to(device=embed.device, dtype=torch.float32))  # fp32 even under AMP
        self.n_ctx, self.classnames, self.class_token_position = n_ctx, classnames, class_token_position

        source_ids = tokenize(tokenizer, [f"{placeholder} {name}." for name in classnames], context_length)
        source_ids = source_ids.to(embed.device)
        name_lengths = [len(tokenizer.encode(name)) if hasattr(tokenizer, "encode") else 0 for name in classnames]
        length = source_ids.shape[1]
        order = torch.tensor(
            [_position_order(n_ctx, n, length, class_token_position) for n in name_lengths], device=embed.device
        )
        positions = torch.arange(length, device=embed.device)
        lengths = torch.tensor(name_lengths, device=embed.device)[:, None]
        source_class_mask = (positions >= 1 + n_ctx) & (positions < 1 + n_ctx + lengths)
        with torch.no_grad():
            source_embeddings = token_embeddings(model, source_ids).to(dtype)
        self.register_buffer("source_ids", source_ids, persistent=False)
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("token_ids", source_ids.gather(1, order), persistent=False)
        self.register_buffer("class_mask", source_class_mask.gather(1, order), persistent=False)
        self.register_buffer("prefix", source_embeddings[:, :1], persistent=False)
        self.register_buffer("suffix", source_embeddings[:, 1 + n_ctx :], persistent=False)

    def forward(self) -> torch.Tensor:
        n_classes = self.prefix.shape[0]
        ctx = self.ctx if self.ctx.dim() == 3 else self.ctx.unsqueeze(0).expand(n_classes, -1, -1)
        source = torch.cat([self.prefix, ctx.to(self.prefix.dtype), self.suffix], dim=1)
        return source.gather(1, self.order[..., None].expand(-1, -1, source.shape[-1]))


def decode_prompts(learner: PromptLearner, model: nn.Module) -> torch.Tensor:
    """Token ids (C, L) of the assembled prompts, each context slot read back as its nearest vocabulary token.

    Nearest by Euclidean distance to the token embedding table, as CoOp's interpret_prompt does; the other slots
    keep their token ids. Freshly initialised from ctx_init, this gives back tokenize(ctx words + class + ".").
    """
    table = text_tower(model).token_embedding.weight.detach().float()
    flat = learner.ctx.detach().float().reshape(-1, table.shape[1])
    nearest = torch.cat([torch.cdist(rows, table).argmin(dim=-1) for rows in flat.split(256)])  # 256 x vocab at a time
    n_classes = learner.order.shape[0]
    nearest = nearest.reshape(-1, learner.n_ctx).expand(n_classes, -1)  # shared ctx: one row for every class
    source = torch.cat([learner.source_ids[:, :1], nearest, learner.source_ids[:, 1 + learner.n_ctx :]], dim=1)
    return source.gather(1, learner.order)


def class_logits(model: nn.Module, prompts: torch.Tensor, token_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
    """logit_scale·cos (B, C) of image features (B, E) against prompt embeddings (C, L, width), no relevance."""
    text_features = F.normalize(encode_text_embeddings(model, prompts, token_ids), dim=-1)
    return model.logit_scale.exp() * F.normalize(image_features, dim=-1) @ text_features.T
