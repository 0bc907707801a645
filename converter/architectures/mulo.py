"""muLO: ``MuAdafacMLPLOpt`` (bentherien/mu_learned_optimization @e160d548, ``src/mup_adafac_mlp_lopt.py``).

Its theta is exactly small_fc_lopt's (see ``adafac.py``); the class adds ``clip_grad`` and ``mup_lrs``
(stored, unused: the per-tensor muP scales come from the model at run time, see ``pylo_runtime.mulo``).
muLO's meta-training saves theta with ``pickle.dump`` (``helpers.save_checkpoint``: a dict of jax arrays),
without the constructor arguments: pass them with ``--set`` (muLO's configs use ``hidden_size=32``;
``step_mult`` is ``adafac_step_mult``, 0.001 in ``config_base.py``). Such pickles load without jax through
``converter.jax_pickle`` (only with ``--allow-pickle``). Because the tree equals small_fc_lopt's, ``auto``
never picks muLO: choose it with the ``mulo`` subcommand or ``--set architecture=mulo``.
"""

from __future__ import annotations

from lopt_bridge.pylo_runtime.specs import mulo as mulo_spec

from .adafac import AdafacFamily

MULO = AdafacFamily(
    "mulo",
    ("MuAdafacMLPLOpt",),
    mulo_spec,
    detectable=False,
    expects="the small_fc_lopt tree; never auto-detected: choose it with --set architecture=mulo",
)

ARCHITECTURES = [MULO]
