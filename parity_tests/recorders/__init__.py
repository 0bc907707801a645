"""One module per family that drives the JAX reference (importable only where the reference is).

Contract (each ``parity_tests/recorders/<family>.py``):

``CASES: dict[str, dict]``
    fixture case name (e.g. ``"velo_default"``) -> options for ``make_reference``.
``make_reference(options: dict, ckpt_dir: pathlib.Path, seed: int) -> Reference``
    builds the reference optimizer (theta random-and-perturbed, or real weights) and WRITES its checkpoint
    into ``ckpt_dir`` in the original on-disk format with the reference's own code.

``Reference`` (any object) has:
    ``architecture: str``            runtime architecture id ("velo", "celo", ...)
    ``source: str``                  path (relative to ckpt_dir, or absolute for ../shared weights) to convert
    ``source_format: str``           "lo_params_gin" | "lo_no_config" | "theta_state" | "pickle"
    ``convert_sets: dict``           extra ``--set key=value`` the converter needs (no_config / theta.state)
    ``provenance: dict``             reference repo + commit, how the checkpoint was made
    ``init(params: dict[str, np.ndarray], num_steps: int) -> state``
    ``update(state, grads: dict[str, np.ndarray], loss: float) -> state``
    ``params(state) -> dict[str, np.ndarray]``
Imports of jax and the reference happen inside these functions, never at module import.
"""
