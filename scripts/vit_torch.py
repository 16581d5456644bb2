"""normlab's ViT written out in PyTorch, in timm's VisionTransformer layout (names, shapes,
pre- or post-norm blocks, every block norm normlab takes), so the goldens need no timm."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm over batch x tokens per feature: BatchNorm1d on the [B·T, D] rows."""

    def forward(self, x):
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)


def vit_norm(kind, d):
    return {
        "layernorm": lambda: nn.LayerNorm(d, eps=1e-6),
        "rms": lambda: nn.RMSNorm(d, eps=1e-6),
        "bn": lambda: TokenBatchNorm(d),
        "none": lambda: nn.Identity(),
    }[kind]()


class VitAttention(nn.Module):
    """timm's Attention (fused qkv with bias, no q/k norm, no dropout), the explicit path."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q * (d // self.heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, t, d))


class VitMlp(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class VitBlock(nn.Module):
    def __init__(self, d, heads, ratio, norm, placement):
        super().__init__()
        self.placement = placement
        self.norm1 = vit_norm(norm, d)
        self.attn = VitAttention(d, heads)
        self.norm2 = vit_norm(norm, d)
        self.mlp = VitMlp(d, d * ratio)

    def forward(self, x):
        if self.placement == "pre":
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x))
        return self.norm2(x + self.mlp(x))


class VitPatchEmbed(nn.Module):
    def __init__(self, c, d, p):
        super().__init__()
        self.proj = nn.Conv2d(c, d, p, stride=p)


class Vit(nn.Module):
    """timm's VisionTransformer(class_token=True, global_pool='token', no dropout)."""

    def __init__(self, c, side, classes, d, depth, heads, patch, ratio=4, norm="layernorm", placement="pre"):
        super().__init__()
        t = (side // patch) ** 2 + 1
        self.patch_embed = VitPatchEmbed(c, d, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, t, d) * 0.02)
        self.blocks = nn.Sequential(*[VitBlock(d, heads, ratio, norm, placement) for _ in range(depth)])
        self.norm = vit_norm(norm, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])
