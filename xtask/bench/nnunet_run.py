"""Train and run nnU-Net v2 (2D, CPU) on one split of a genseg-layout dataset.

Driven by `cargo xtask bench-vs-nnunet`; not part of CI. The dataset folder has
images/<id>.png and masks/<id>.png (0 / non-zero); the split file is genseg's
(`genseg data split`: nnU-Net's splits_final.json format plus a "test" list).
Images are resized to --size (bicubic; masks nearest) so that both sides see
the same pixels, written as an nnU-Net raw dataset (train + val in imagesTr,
test in imagesTs), planned and preprocessed for 2d, trained on fold 0 of our
split, and used to predict the test cases (and every case of each --ood
folder) with nnU-Net's default mirroring TTA. Prints one JSON line with the
wall times and the prediction folders, which `genseg score` then scores.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image


def resized(path, size, mask):
    img = Image.open(path)
    if mask:
        img = img.convert("L").resize((size, size), Image.NEAREST)
        return img.point(lambda v: 1 if v > 0 else 0)
    img = img.convert("RGB") if img.mode not in ("L", "I;16", "I") else img.convert("L")
    return img.resize((size, size), Image.BICUBIC)


def write_cases(data, ids, size, images_dir, labels_dir=None):
    images_dir.mkdir(parents=True, exist_ok=True)
    channels = None
    for case in ids:
        img = resized(data / "images" / f"{case}.png", size, False)
        channels = len(img.getbands())
        img.save(images_dir / f"{case}_0000.png")
        if labels_dir is not None:
            labels_dir.mkdir(parents=True, exist_ok=True)
            resized(data / "masks" / f"{case}.png", size, True).save(labels_dir / f"{case}.png")
    return channels


def run(cmd, env, log):
    # nnU-Net's commands live next to this interpreter (the venv's bin/, not on PATH).
    cmd = [str(Path(sys.executable).parent / cmd[0])] + cmd[1:]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    start = time.time()
    with open(log, "a") as out:
        subprocess.run(cmd, env=env, check=True, stdout=out, stderr=subprocess.STDOUT)
    return time.time() - start


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--split-file", type=Path, required=True)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--dataset-id", type=int, default=501)
    p.add_argument("--trainer", default="nnUNetTrainer_50epochs")
    p.add_argument("--ood", type=Path, action="append", default=[])
    a = p.parse_args()

    split = json.loads(a.split_file.read_text())[0]
    work = a.work.resolve()
    name = f"Dataset{a.dataset_id:03d}_genseg"
    raw = work / "nnUNet_raw" / name
    env = dict(os.environ)
    env.update(
        nnUNet_raw=str(work / "nnUNet_raw"),
        nnUNet_preprocessed=str(work / "nnUNet_preprocessed"),
        nnUNet_results=str(work / "nnUNet_results"),
    )
    log = work / "nnunet.log"
    work.mkdir(parents=True, exist_ok=True)

    train_ids = split["train"] + split["val"]
    channels = write_cases(a.data, train_ids, a.size, raw / "imagesTr", raw / "labelsTr")
    write_cases(a.data, split["test"], a.size, raw / "imagesTs")
    names = {"0": "L"} if channels == 1 else {"0": "R", "1": "G", "2": "B"}
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": names,
        "labels": {"background": 0, "foreground": 1},
        "numTraining": len(train_ids),
        "file_ending": ".png",
    }, indent=2))

    times = {}
    times["plan_seconds"] = run(
        ["nnUNetv2_plan_and_preprocess", "-d", str(a.dataset_id), "-c", "2d",
         "--verify_dataset_integrity", "-np", "2"], env, log)
    pre = work / "nnUNet_preprocessed" / name
    (pre / "splits_final.json").write_text(
        json.dumps([{"train": split["train"], "val": split["val"]}], indent=2))
    times["train_seconds"] = run(
        ["nnUNetv2_train", str(a.dataset_id), "2d", "0", "-tr", a.trainer, "-device", "cpu"],
        env, log)
    predictions = {}
    sets = [("test", raw / "imagesTs")]
    for ood in a.ood:
        folder = work / f"ood-{ood.name}"
        ids = sorted(f.stem for f in (ood / "images").glob("*.png"))
        write_cases(ood, ids, a.size, folder)
        sets.append((ood.name, folder))
    predict_seconds = 0.0
    for label, folder in sets:
        out = work / f"pred-{label}"
        predict_seconds += run(
            ["nnUNetv2_predict", "-i", str(folder), "-o", str(out), "-d", str(a.dataset_id),
             "-c", "2d", "-f", "0", "-tr", a.trainer, "-device", "cpu"], env, log)
        predictions[label] = str(out)
    times["predict_seconds"] = predict_seconds
    print(json.dumps({**times, "predictions": predictions}))


if __name__ == "__main__":
    main()
