"""Offsite on a decoder: the emulator's and full fine-tuning's ROUGE-L and exact match are recorded each round.

A decoder's utility is its exact match, which a short schedule often leaves at 0 for the
plug-in, the emulator and the full fine-tuning alike; the emulator gap is then only readable
in ROUGE-L, so the round's record carries ``emulator_rouge_l`` / ``full_ft_rouge_l`` (and
``..._exact_match``) beside the plug-in's ``rouge_l``.
"""

from __future__ import annotations

import torch

from guardedtuning.server_app import offsite_driver


class _Model(torch.nn.Module):
    def __init__(self, em: float, rouge: float) -> None:
        super().__init__()
        self.figures = {"utility": em, "exact_match": em, "rouge_l": rouge, "eval_rows": 4.0}


class _Reference:
    def __init__(self) -> None:
        self.model = _Model(0.5, 0.75)
        self.rounds: list[int] = []

    def train_round(self, round_: int, clients: int) -> None:
        self.rounds.append(round_)


class _Run:
    per_round = 2

    def evaluate(self, model: _Model) -> dict[str, float]:
        return dict(model.figures)


def test_the_emulator_and_full_ft_rouge_l_of_a_decoder_are_in_the_round_record():
    ref = _Reference()
    plug, extra = offsite_driver._evaluate(_Run(), _Model(0.25, 0.5), _Model(0.0, 0.375), ref, {}, 3)
    assert plug["rouge_l"] == 0.5 and extra["rouge_l"] == 0.5 and ref.rounds == [3]
    assert extra["emulator_utility"] == 0.0 and extra["emulator_rouge_l"] == 0.375
    assert extra["emulator_exact_match"] == 0.0
    assert extra["full_ft_utility"] == 0.5 and extra["full_ft_rouge_l"] == 0.75 and extra["full_ft_exact_match"] == 0.5
    assert "emulator_eval_rows" not in extra  # only the decoder's figures, not every key


def test_an_encoder_round_record_is_unchanged():
    class Enc(_Model):
        def __init__(self, acc: float) -> None:
            torch.nn.Module.__init__(self)
            self.figures = {"utility": acc, "accuracy": acc, "test_loss": 1.0}

    class Ref(_Reference):
        def __init__(self) -> None:
            self.model, self.rounds = Enc(0.7), []

    _, extra = offsite_driver._evaluate(_Run(), Enc(0.6), Enc(0.5), Ref(), {}, 1)
    assert set(extra) == {"accuracy", "test_loss", "emulator_utility", "full_ft_utility"}
