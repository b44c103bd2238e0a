"""Backdoor attacks on a federation: triggers, data poisoning, model replacement, and their metrics."""
from dimat.attacks.metrics import attack_success_rate, clean_accuracy
from dimat.attacks.poison import poison_dataset, scale_update
from dimat.attacks.triggers import BadNetsTrigger, BlendedTrigger, Trigger, build_trigger

__all__ = [
    "BadNetsTrigger",
    "BlendedTrigger",
    "Trigger",
    "attack_success_rate",
    "build_trigger",
    "clean_accuracy",
    "poison_dataset",
    "scale_update",
]

from dimat.attacks.federation import Attack, build_attack  # noqa: E402

__all__ += ["Attack", "build_attack"]
