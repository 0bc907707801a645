"""Helpers for training stacks that call ``optimizer.step()`` themselves (docs/integrations.md).

The loss reaches VeLO / Celo / Celo-Adam the same way everywhere: ``pylo_runtime.set_loss(optimizer, loss)``
after each backward pass (it finds the pylo_runtime optimizer inside Accelerate's and Lightning's wrappers).
Only the Hugging Face Trainer, whose training step is internal, needs a helper:
``pylo_runtime.integrations.hf_trainer.attach(trainer)``. Nothing here imports accelerate, transformers or
lightning until it is used (they are the optional ``integrations`` extra).
"""
