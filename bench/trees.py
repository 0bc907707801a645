"""Parameter-tree shapes the benchmarks time: a small CPU tree and a ViT-B/16-shaped tree.

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


TREES = {"small": small_tree, "vit": vit_b16_tree}


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
