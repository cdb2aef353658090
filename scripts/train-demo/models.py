"""The demo model's four networks in PyTorch, for training: FLUX.1's transformer, its 16-channel
autoencoder, a T5 encoder and a CLIP text encoder, at tiny sizes.

Every module computes what Parallax's Rust code computes (src/model/flux.rs, src/model/vae/,
candle-transformers' T5 and CLIP) and names its parameters as the real checkpoints do (BFL names
for the transformer and autoencoder, transformers' names for the text encoders), so
`state_dict()` can be written straight into FLUX.1's file layouts. The parity fixture that
train.py writes lets a Rust test check the two sides agree.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# Configurations (kept in step with the Rust side: FluxConfig::demo, VaeConfig::demo,
# t5_demo_config, clip_demo_config)
# ----------------------------------------------------------------------------------------------

FLUX = dict(in_channels=64, vec_in_dim=64, context_in_dim=128, hidden_size=128, mlp_ratio=4.0,
            num_heads=2, depth=2, depth_single_blocks=6, axes_dim=[8, 28, 28], theta=10000.0,
            qkv_bias=True, guidance_embed=True)
VAE = dict(in_channels=3, out_channels=3, ch=16, ch_mult=[1, 1, 2, 2], num_res_blocks=1,
           z_channels=16, norm_groups=8, scaling_factor=0.3611, shift_factor=0.1159)
T5 = dict(vocab_size=259, d_model=128, d_kv=32, d_ff=256, num_layers=3, num_heads=4,
          relative_attention_num_buckets=32, relative_attention_max_distance=128,
          layer_norm_epsilon=1e-6)
CLIP = dict(vocab_size=259, hidden_size=64, intermediate_size=128, max_position_embeddings=77,
            num_hidden_layers=2, num_attention_heads=2)
T5_LEN = 96
CLIP_LEN = 77
PAD, BOS, EOS = 0, 257, 258


def tokenize(caption):
    """The demo byte tokenizers (src/model/tokenizer.rs, PromptTokenizer::demo): lower case, one
    id per UTF-8 byte (byte + 1); T5 gets `bytes EOS` padded with 0, CLIP `BOS bytes EOS` padded
    with EOS; too long prompts keep their end token."""
    b = [x + 1 for x in caption.lower().encode("utf-8")]
    t5 = b[: T5_LEN - 1] + [EOS]
    t5 += [PAD] * (T5_LEN - len(t5))
    clip = [BOS] + b[: CLIP_LEN - 2] + [EOS]
    clip += [EOS] * (CLIP_LEN - len(clip))
    return t5, clip


# ----------------------------------------------------------------------------------------------
# FLUX.1 transformer
# ----------------------------------------------------------------------------------------------

def timestep_embedding(t, dim=256, max_period=10000.0, time_factor=1000.0):
    t = time_factor * t.float()
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64, device=t.device) / half).float()
    args = t[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_tables(ids, axes_dim, theta):
    """cos, sin (L, D/2) for position ids (L, n_axes)."""
    angles = []
    for a, dim in enumerate(axes_dim):
        omega = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim))
        angles.append(ids[:, a:a + 1].double() * omega[None])
    ang = torch.cat(angles, dim=1).float()
    return ang.cos(), ang.sin()


def position_ids(txt_len, h, w, device):
    ids = torch.zeros(txt_len + h * w, 3, device=device)
    r = torch.arange(h, device=device).repeat_interleave(w)
    c = torch.arange(w, device=device).repeat(h)
    ids[txt_len:, 1] = r.float()
    ids[txt_len:, 2] = c.float()
    return ids


def apply_rope(x, cos, sin):
    """Interleaved pairs (2i, 2i+1) turned by angle i; x (B, H, L, D)."""
    x = x.float()
    x0, x1 = x[..., 0::2], x[..., 1::2]
    o0 = x0 * cos - x1 * sin
    o1 = x0 * sin + x1 * cos
    return torch.stack([o0, o1], dim=-1).flatten(-2)


def rms_norm(x, scale, eps=1e-6):
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * scale.float()


def ln(x):
    return F.layer_norm(x.float(), (x.shape[-1],), eps=1e-6)


def gelu(x):
    return F.gelu(x, approximate="tanh")


class MlpEmbedder(nn.Module):
    def __init__(self, i, h):
        super().__init__()
        self.in_layer = nn.Linear(i, h)
        self.out_layer = nn.Linear(h, h)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


class QkNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.query_norm = nn.Module()
        self.query_norm.scale = nn.Parameter(torch.ones(d))
        self.key_norm = nn.Module()
        self.key_norm.scale = nn.Parameter(torch.ones(d))


class SelfAttn(nn.Module):
    def __init__(self, h, heads, bias):
        super().__init__()
        self.qkv = nn.Linear(h, 3 * h, bias=bias)
        self.norm = QkNorm(h // heads)
        self.proj = nn.Linear(h, h)


class Modulation(nn.Module):
    def __init__(self, h, double):
        super().__init__()
        self.n = 2 if double else 1
        self.lin = nn.Linear(h, 3 * self.n * h)

    def forward(self, vec):
        out = self.lin(F.silu(vec))[:, None, :].chunk(3 * self.n, dim=-1)
        return [out[3 * i:3 * i + 3] for i in range(self.n)]


def qkv_heads(qkv, norm, heads):
    b, l, _ = qkv.shape
    q, k, v = qkv.reshape(b, l, 3, heads, -1).permute(2, 0, 3, 1, 4)
    return rms_norm(q, norm.query_norm.scale), rms_norm(k, norm.key_norm.scale), v


def attention(q, k, v, cos, sin):
    q = apply_rope(q, cos, sin).to(v.dtype)
    k = apply_rope(k, cos, sin).to(v.dtype)
    o = F.scaled_dot_product_attention(q, k, v)
    b, h, l, d = o.shape
    return o.transpose(1, 2).reshape(b, l, h * d)


def modulate(x, shift, scale):
    return (ln(x) * (1 + scale.float()) + shift.float()).to(x.dtype)


class DoubleBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        h, heads = c["hidden_size"], c["num_heads"]
        mlp = int(h * c["mlp_ratio"])
        self.heads = heads
        for s in ("img", "txt"):
            setattr(self, f"{s}_mod", Modulation(h, True))
            setattr(self, f"{s}_attn", SelfAttn(h, heads, c["qkv_bias"]))
            setattr(self, f"{s}_mlp", nn.Sequential(nn.Linear(h, mlp), nn.GELU(approximate="tanh"), nn.Linear(mlp, h)))

    def forward(self, img, txt, vec, cos, sin):
        im1, im2 = self.img_mod(vec)
        tm1, tm2 = self.txt_mod(vec)
        iq, ik, iv = qkv_heads(self.img_attn.qkv(modulate(img, im1[0], im1[1])), self.img_attn.norm, self.heads)
        tq, tk, tv = qkv_heads(self.txt_attn.qkv(modulate(txt, tm1[0], tm1[1])), self.txt_attn.norm, self.heads)
        q = torch.cat([tq, iq], 2)
        k = torch.cat([tk, ik], 2)
        v = torch.cat([tv, iv], 2)
        a = attention(q, k, v, cos, sin)
        L = txt.shape[1]
        ta, ia = a[:, :L], a[:, L:]
        img = img + im1[2] * self.img_attn.proj(ia)
        img = img + im2[2] * self.img_mlp(modulate(img, im2[0], im2[1]))
        txt = txt + tm1[2] * self.txt_attn.proj(ta)
        txt = txt + tm2[2] * self.txt_mlp(modulate(txt, tm2[0], tm2[1]))
        return img, txt


class SingleBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        h, heads = c["hidden_size"], c["num_heads"]
        self.h, self.heads = h, heads
        self.mlp = int(h * c["mlp_ratio"])
        self.linear1 = nn.Linear(h, 3 * h + self.mlp)
        self.linear2 = nn.Linear(h + self.mlp, h)
        self.norm = QkNorm(h // heads)
        self.modulation = Modulation(h, False)

    def forward(self, x, vec, cos, sin):
        (m,) = self.modulation(vec)
        xm = modulate(x, m[0], m[1])
        qkv, mlp = torch.split(self.linear1(xm), [3 * self.h, self.mlp], dim=-1)
        q, k, v = qkv_heads(qkv, self.norm, self.heads)
        a = attention(q, k, v, cos, sin)
        out = self.linear2(torch.cat([a, gelu(mlp)], dim=-1))
        return x + m[2] * out


class FinalLayer(nn.Module):
    def __init__(self, h, out):
        super().__init__()
        self.linear = nn.Linear(h, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, 2 * h))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear(modulate(x, shift, scale))


class Flux(nn.Module):
    def __init__(self, c=FLUX):
        super().__init__()
        self.c = c
        h = c["hidden_size"]
        self.img_in = nn.Linear(c["in_channels"], h)
        self.txt_in = nn.Linear(c["context_in_dim"], h)
        self.time_in = MlpEmbedder(256, h)
        self.vector_in = MlpEmbedder(c["vec_in_dim"], h)
        if c["guidance_embed"]:
            self.guidance_in = MlpEmbedder(256, h)
        self.double_blocks = nn.ModuleList([DoubleBlock(c) for _ in range(c["depth"])])
        self.single_blocks = nn.ModuleList([SingleBlock(c) for _ in range(c["depth_single_blocks"])])
        self.final_layer = FinalLayer(h, c["in_channels"])

    def forward(self, img, txt, y, t, guidance, hw):
        """img (B, N, 64) packed latent, txt (B, L, ctx), y (B, vec), t (B,), guidance (B,),
        hw = (h, w) of the patch grid."""
        h, w = hw
        cos, sin = rope_tables(position_ids(txt.shape[1], h, w, img.device), self.c["axes_dim"], self.c["theta"])
        img = self.img_in(img)
        txt = self.txt_in(txt)
        vec = self.time_in(timestep_embedding(t).to(img.dtype))
        if self.c["guidance_embed"]:
            vec = vec + self.guidance_in(timestep_embedding(guidance).to(img.dtype))
        vec = vec + self.vector_in(y)
        for b in self.double_blocks:
            img, txt = b(img, txt, vec, cos, sin)
        x = torch.cat([txt, img], 1)
        for b in self.single_blocks:
            x = b(x, vec, cos, sin)
        img = x[:, txt.shape[1]:]
        return self.final_layer(img, vec)


def pack(x):
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x, h, w):
    b, n, cp = x.shape
    c = cp // 4
    return x.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


# ----------------------------------------------------------------------------------------------
# Autoencoder (BFL's names)
# ----------------------------------------------------------------------------------------------

def swish(x):
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, i, o, g):
        super().__init__()
        self.norm1 = nn.GroupNorm(g, i, eps=1e-6)
        self.conv1 = nn.Conv2d(i, o, 3, 1, 1)
        self.norm2 = nn.GroupNorm(g, o, eps=1e-6)
        self.conv2 = nn.Conv2d(o, o, 3, 1, 1)
        if i != o:
            self.nin_shortcut = nn.Conv2d(i, o, 1)

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        s = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return s + h


class AttnBlock(nn.Module):
    def __init__(self, c, g):
        super().__init__()
        self.norm = nn.GroupNorm(g, c, eps=1e-6)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (m(n).reshape(b, c, h * w).transpose(1, 2)[:, None] for m in (self.q, self.k, self.v))
        o = F.scaled_dot_product_attention(q, k, v)[:, 0]
        return x + self.proj_out(o.transpose(1, 2).reshape(b, c, h, w))


class Level(nn.Module):
    pass


class Encoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        g = c["norm_groups"]
        self.conv_in = nn.Conv2d(c["in_channels"], c["ch"], 3, 1, 1)
        self.down = nn.ModuleList()
        block_in = c["ch"]
        for i, m in enumerate(c["ch_mult"]):
            lvl = Level()
            lvl.block = nn.ModuleList()
            for _ in range(c["num_res_blocks"]):
                lvl.block.append(ResnetBlock(block_in, c["ch"] * m, g))
                block_in = c["ch"] * m
            if i + 1 != len(c["ch_mult"]):
                lvl.downsample = Level()
                lvl.downsample.conv = nn.Conv2d(block_in, block_in, 3, 2, 0)
            self.down.append(lvl)
        self.mid = Level()
        self.mid.block_1 = ResnetBlock(block_in, block_in, g)
        self.mid.attn_1 = AttnBlock(block_in, g)
        self.mid.block_2 = ResnetBlock(block_in, block_in, g)
        self.norm_out = nn.GroupNorm(g, block_in, eps=1e-6)
        self.conv_out = nn.Conv2d(block_in, 2 * c["z_channels"], 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for lvl in self.down:
            for b in lvl.block:
                h = b(h)
            if hasattr(lvl, "downsample"):
                h = lvl.downsample.conv(F.pad(h, (0, 1, 0, 1)))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        g = c["norm_groups"]
        levels = len(c["ch_mult"])
        block_in = c["ch"] * c["ch_mult"][-1]
        self.conv_in = nn.Conv2d(c["z_channels"], block_in, 3, 1, 1)
        self.mid = Level()
        self.mid.block_1 = ResnetBlock(block_in, block_in, g)
        self.mid.attn_1 = AttnBlock(block_in, g)
        self.mid.block_2 = ResnetBlock(block_in, block_in, g)
        ups = [None] * levels
        for i in reversed(range(levels)):
            lvl = Level()
            lvl.block = nn.ModuleList()
            out = c["ch"] * c["ch_mult"][i]
            for _ in range(c["num_res_blocks"] + 1):
                lvl.block.append(ResnetBlock(block_in, out, g))
                block_in = out
            if i != 0:
                lvl.upsample = Level()
                lvl.upsample.conv = nn.Conv2d(block_in, block_in, 3, 1, 1)
            ups[i] = lvl
        self.up = nn.ModuleList(ups)
        self.norm_out = nn.GroupNorm(g, block_in, eps=1e-6)
        self.conv_out = nn.Conv2d(block_in, c["out_channels"], 3, 1, 1)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i in reversed(range(len(self.up))):
            lvl = self.up[i]
            for b in lvl.block:
                h = b(h)
            if hasattr(lvl, "upsample"):
                h = lvl.upsample.conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(swish(self.norm_out(h)))


class AutoEncoder(nn.Module):
    def __init__(self, c=VAE):
        super().__init__()
        self.c = c
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)

    def moments(self, x):
        m = self.encoder(x)
        return m[:, : self.c["z_channels"]], m[:, self.c["z_channels"]:]

    def scale(self, mean):
        return (mean - self.c["shift_factor"]) * self.c["scaling_factor"]

    def decode(self, z):
        """Decode a scaled latent."""
        return self.decoder(z / self.c["scaling_factor"] + self.c["shift_factor"])


# ----------------------------------------------------------------------------------------------
# T5 encoder (transformers' names; candle-transformers' computation)
# ----------------------------------------------------------------------------------------------

def t5_buckets(length, num_buckets, max_distance):
    """Bidirectional relative-position buckets (q, k), as candle-transformers computes them."""
    nb = num_buckets // 2
    max_exact = nb // 2
    out = torch.zeros(length, length, dtype=torch.long)
    for i in range(length):
        for j in range(length):
            if i < j:
                d = j - i
                if d < max_exact:
                    b = d + nb
                else:
                    f = math.log(d / max_exact) / math.log(max_distance / max_exact) * (nb - max_exact)
                    b = min(max_exact + nb + int(torch.tensor(f, dtype=torch.float32).item()), num_buckets - 1)
            else:
                d = i - j
                if d < max_exact:
                    b = d
                else:
                    f = math.log(d / max_exact) / math.log(max_distance / max_exact) * (nb - max_exact)
                    b = min(max_exact + int(torch.tensor(f, dtype=torch.float32).item()), nb - 1)
            out[i, j] = b
    return out


class T5Norm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        xf = xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight.to(x.dtype)


class T5Attention(nn.Module):
    def __init__(self, c, bias):
        super().__init__()
        inner = c["num_heads"] * c["d_kv"]
        self.q = nn.Linear(c["d_model"], inner, bias=False)
        self.k = nn.Linear(c["d_model"], inner, bias=False)
        self.v = nn.Linear(c["d_model"], inner, bias=False)
        self.o = nn.Linear(inner, c["d_model"], bias=False)
        if bias:
            self.relative_attention_bias = nn.Embedding(c["relative_attention_num_buckets"], c["num_heads"])
        self.h, self.d = c["num_heads"], c["d_kv"]


class T5Layer(nn.Module):
    pass


class T5Block(nn.Module):
    def __init__(self, c, first):
        super().__init__()
        a = T5Layer()
        a.SelfAttention = T5Attention(c, first)
        a.layer_norm = T5Norm(c["d_model"], c["layer_norm_epsilon"])
        f = T5Layer()
        f.DenseReluDense = T5Layer()
        f.DenseReluDense.wi_0 = nn.Linear(c["d_model"], c["d_ff"], bias=False)
        f.DenseReluDense.wi_1 = nn.Linear(c["d_model"], c["d_ff"], bias=False)
        f.DenseReluDense.wo = nn.Linear(c["d_ff"], c["d_model"], bias=False)
        f.layer_norm = T5Norm(c["d_model"], c["layer_norm_epsilon"])
        self.layer = nn.ModuleList([a, f])


class T5Encoder(nn.Module):
    def __init__(self, c=T5, length=T5_LEN):
        super().__init__()
        self.c = c
        self.shared = nn.Embedding(c["vocab_size"], c["d_model"])
        self.encoder = T5Layer()
        self.encoder.block = nn.ModuleList([T5Block(c, i == 0) for i in range(c["num_layers"])])
        self.encoder.final_layer_norm = T5Norm(c["d_model"], c["layer_norm_epsilon"])
        self.register_buffer("buckets", t5_buckets(length, c["relative_attention_num_buckets"],
                                                   c["relative_attention_max_distance"]), persistent=False)

    def forward(self, ids):
        x = self.shared(ids)
        b, L, _ = x.shape
        bias = None
        for blk in self.encoder.block:
            att, ff = blk.layer
            sa = att.SelfAttention
            h = att.layer_norm(x)
            q = sa.q(h).reshape(b, L, sa.h, sa.d).transpose(1, 2)
            k = sa.k(h).reshape(b, L, sa.h, sa.d).transpose(1, 2)
            v = sa.v(h).reshape(b, L, sa.h, sa.d).transpose(1, 2)
            if bias is None:
                bias = sa.relative_attention_bias(self.buckets[:L, :L]).permute(2, 0, 1)[None].to(q.dtype)
            s = q @ k.transpose(-1, -2) + bias
            p = torch.softmax(s.float(), -1).to(v.dtype)
            o = (p @ v).transpose(1, 2).reshape(b, L, sa.h * sa.d)
            x = x + sa.o(o)
            h = ff.layer_norm(x)
            d = ff.DenseReluDense
            x = x + d.wo(gelu(d.wi_0(h)) * d.wi_1(h))
        return self.encoder.final_layer_norm(x)


# ----------------------------------------------------------------------------------------------
# CLIP text encoder (transformers' names)
# ----------------------------------------------------------------------------------------------

class ClipLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        d = c["hidden_size"]
        self.self_attn = T5Layer()
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self.self_attn, n, nn.Linear(d, d))
        self.layer_norm1 = nn.LayerNorm(d, eps=1e-5)
        self.mlp = T5Layer()
        self.mlp.fc1 = nn.Linear(d, c["intermediate_size"])
        self.mlp.fc2 = nn.Linear(c["intermediate_size"], d)
        self.layer_norm2 = nn.LayerNorm(d, eps=1e-5)
        self.h = c["num_attention_heads"]

    def forward(self, x, mask):
        b, L, d = x.shape
        a = self.self_attn
        h = self.layer_norm1(x)
        q = a.q_proj(h).reshape(b, L, self.h, -1).transpose(1, 2)
        k = a.k_proj(h).reshape(b, L, self.h, -1).transpose(1, 2)
        v = a.v_proj(h).reshape(b, L, self.h, -1).transpose(1, 2)
        s = (q * (q.shape[-1] ** -0.5)) @ k.transpose(-1, -2) + mask
        o = (torch.softmax(s.float(), -1).to(v.dtype) @ v).transpose(1, 2).reshape(b, L, d)
        x = x + a.out_proj(o)
        h = self.mlp.fc1(self.layer_norm2(x))
        return x + self.mlp.fc2(h * torch.sigmoid(1.702 * h))


class ClipText(nn.Module):
    def __init__(self, c=CLIP):
        super().__init__()
        d = c["hidden_size"]
        self.text_model = T5Layer()
        self.text_model.embeddings = T5Layer()
        self.text_model.embeddings.token_embedding = nn.Embedding(c["vocab_size"], d)
        self.text_model.embeddings.position_embedding = nn.Embedding(c["max_position_embeddings"], d)
        self.text_model.encoder = T5Layer()
        self.text_model.encoder.layers = nn.ModuleList([ClipLayer(c) for _ in range(c["num_hidden_layers"])])
        self.text_model.final_layer_norm = nn.LayerNorm(d, eps=1e-5)

    def forward(self, ids):
        """The pooled output: the final state at the first end token."""
        tm = self.text_model
        b, L = ids.shape
        x = tm.embeddings.token_embedding(ids) + tm.embeddings.position_embedding.weight[:L][None]
        mask = torch.full((L, L), float("-inf"), device=ids.device).triu(1)
        for layer in tm.encoder.layers:
            x = layer(x, mask)
        x = tm.final_layer_norm(x)
        first_eos = (ids == EOS).int().argmax(-1)
        return x[torch.arange(b, device=ids.device), first_eos]
