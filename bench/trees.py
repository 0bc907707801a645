"""Parameter-tree shapes the benchmarks time: a small CPU tree, a ResNet-18-shaped and a ViT-B/16-shaped tree.

Plain data (no torch/jax import) so the JAX worker process can use the same definition.
"""

from __future__ import annotations


def small_tree() -> dict[str, tuple[int, ...]]:
    """3 x (1024, 1024) + 3 x (1024,): 3.1M parameters (the issue's CPU target tree)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(3):
        shapes[f"w{i}"] = (1024, 1024)
        shapes[f"b{i}"] = (1024,)
    return shapes


def vit_b16_tree(num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """timm ``vit_base_patch16_224`` parameter shapes: 152 tensors, 86.6M parameters."""
    d, mlp, n_tok = 768, 3072, 197
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, n_tok, d),
        "patch_embed.proj.weight": (d, 3, 16, 16),
        "patch_embed.proj.bias": (d,),
    }
    for b in range(12):
        pre = f"blocks.{b}."
        shapes.update(
            {
                pre + "norm1.weight": (d,),
                pre + "norm1.bias": (d,),
                pre + "attn.qkv.weight": (3 * d, d),
                pre + "attn.qkv.bias": (3 * d,),
                pre + "attn.proj.weight": (d, d),
                pre + "attn.proj.bias": (d,),
                pre + "norm2.weight": (d,),
                pre + "norm2.bias": (d,),
                pre + "mlp.fc1.weight": (mlp, d),
                pre + "mlp.fc1.bias": (mlp,),
                pre + "mlp.fc2.weight": (d, mlp),
                pre + "mlp.fc2.bias": (d,),
            }
        )
    shapes.update({"norm.weight": (d,), "norm.bias": (d,)})
    shapes.update({"head.weight": (num_classes, d), "head.bias": (num_classes,)})
    return shapes


def resnet18_tree(num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """torchvision ``resnet18`` parameter shapes: 62 tensors, 11.69M parameters (conv kernels, 1x1
    downsamples, BatchNorm weight / bias vectors, a (1000, 512) head)."""
    shapes: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 7, 7)}
    shapes.update({"bn1.weight": (64,), "bn1.bias": (64,)})
    c_in = 64
    for li, c in enumerate((64, 128, 256, 512), start=1):
        for b in range(2):
            pre = f"layer{li}.{b}."
            first_in = c_in if b == 0 else c
            shapes[pre + "conv1.weight"] = (c, first_in, 3, 3)
            shapes[pre + "bn1.weight"] = (c,)
            shapes[pre + "bn1.bias"] = (c,)
            shapes[pre + "conv2.weight"] = (c, c, 3, 3)
            shapes[pre + "bn2.weight"] = (c,)
            shapes[pre + "bn2.bias"] = (c,)
            if b == 0 and first_in != c:
                shapes[pre + "downsample.0.weight"] = (c, first_in, 1, 1)
                shapes[pre + "downsample.1.weight"] = (c,)
                shapes[pre + "downsample.1.bias"] = (c,)
        c_in = c
    shapes.update({"fc.weight": (num_classes, 512), "fc.bias": (num_classes,)})
    return shapes


TREES = {"small": small_tree, "vit": vit_b16_tree, "conv": resnet18_tree}


def tree_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Shapes of the named tree."""
    try:
        return TREES[name]()
    except KeyError:
        raise ValueError(f"unknown tree {name!r}; known: {', '.join(TREES)}") from None


def num_params(shapes: dict[str, tuple[int, ...]]) -> int:
    """Total element count."""
    total = 0
    for s in shapes.values():
        n = 1
        for d in s:
            n *= d
        total += n
    return total
