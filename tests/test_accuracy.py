"""benchmarks/accuracy.py's pieces: rates with their Wilson interval, the held-out photos of other collections
drawn again as training drew them, and the pets of many breeds counted by breed."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from conftest import make_breeds_folder

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from accuracy import breed_rates, held_out_roles, share, worst_breeds  # noqa: E402

from catdogcnn.predict import Prediction  # noqa: E402
from catdogcnn.train.openset import load_pets  # noqa: E402


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval, from its formula."""
    centre, half = (k + z * z / 2) / (n + z * z), z * math.sqrt(k * (n - k) / n + z * z / 4) / (n + z * z)
    return centre - half, centre + half


def test_a_rate_comes_with_its_wilson_interval():
    low, high = wilson(21, 2000)
    assert share((21, 2000), 2) == f"1.05% [{low:.2%}, {high:.2%}] (21/2000)"
    assert share((0, 40)).startswith("0.0% [0.0%, 8.8%]")  # none of 40: still up to 8.8%
    assert share((0, 0)) == share(None) == "n/a"


def test_pet_photos_are_split_again_as_training_split_them(tmp_path):
    folder = make_breeds_folder(tmp_path / "breeds", 6, breeds=4)
    pets = load_pets(folder, ["cats", "dogs"], [], 32, "bilinear", holdout_breeds=0.25, holdout_photos=0.25, seed=3)
    metadata = {"neither": {"pet_photos": pets.summary},
                "training": {"config": {"pet_holdout_breeds": 0.25, "pet_holdout_photos": 0.25}}}
    roles, note = held_out_roles(folder, metadata, pets=True)
    for role in ("train", "seen", "unseen"):
        assert sorted(f"{p.parent.name}/{p.stem.rsplit('_', 1)[0]}" for p, r in roles.items() if r == role) == \
            sorted(pets.kinds[role])
    assert "WARNING" not in note and "2 breeds never seen" in note
    (folder / "cats" / "breed9_0000.jpg").write_bytes((folder / "cats" / "breed0_0000.jpg").read_bytes())
    assert "WARNING" in held_out_roles(folder, metadata, pets=True)[1]  # another folder: not its own split
    never = held_out_roles(folder, {"neither": {}}, pets=True)[0]  # a bundle that never saw them
    assert set(never.values()) == {"unseen"} and len(never) == 49


class Answers:
    """A classifier that answers "neither" for breed0 photos and the right class for the others."""

    def predict_many(self, paths):
        for path in paths:
            animal = Path(path).parent.name
            yield Prediction(str(path), "neither" if "breed0" in Path(path).name else animal, 0.9)


def test_pets_answered_neither_are_counted_by_breed(tmp_path):
    folder = make_breeds_folder(tmp_path / "breeds", 6, breeds=2)
    roles = {path: "unseen" if "breed1" in path.name else "seen" for path in sorted(folder.glob("*/*.jpg"))}
    roles[next(iter(roles))] = "train"  # photos trained on are not counted
    answered, total, right = breed_rates(Answers(), roles, folder)
    assert (answered["all"], total["all"], right["all"]) == (11, 23, 12)
    assert (answered["seen"], total["seen"], answered["unseen"], total["unseen"]) == (11, 11, 0, 12)
    assert (answered["cats/breed0"], total["cats/breed0"]) == (5, 5)
    assert worst_breeds(answered, total) == "dogs/breed0 6/6, cats/breed0 5/5"
