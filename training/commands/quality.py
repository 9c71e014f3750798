"""Sample-quality figures in the feature space of the project's own classifiers.

No Inception network can be downloaded here, so the Frechet distance (Heusel et al. 2017) and
precision/recall (Kynkaanniemi et al. 2019) use the penultimate layer of a small classifier trained by
`python -m training classifier` and shipped in `training/assets/`: for each dataset one `DigitClassifier`
(128-d) and an independently trained `StridedClassifier` of another architecture (96-d), the second
confirming what the first reads. Figures are comparable within this project, not with published FIDs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from training.models import build_model
from training.models.classifier import CLASSIFIER_ARCHITECTURES, FeatureClassifier
from training.runtime.checkpoint import Checkpoint, ModelConfig, load_checkpoint, save_checkpoint
from training.runtime.device import pick_device
from training.train.data import load_dataset
from training.train.run import RunLog, Stopwatch, batches, seed_everything

ASSETS = Path(__file__).parents[1] / "assets"
EVALUATED_DATASETS = ("mnist", "fashion-mnist")  # the datasets with shipped classifiers
SECOND_ARCH = "strided_classifier"


def classifier_path(dataset: str = "mnist", arch: str = "digit_classifier") -> Path:
    """The shipped classifier of `dataset` (mnist_classifier.safetensors; the second architecture's
    mnist_strided_classifier.safetensors)."""
    return ASSETS / (
        f"{dataset}_classifier.safetensors" if arch == "digit_classifier" else f"{dataset}_{arch}.safetensors"
    )


DEFAULT_CLASSIFIER = classifier_path()


def load_classifier(path: str | Path = DEFAULT_CLASSIFIER, device: torch.device | str = "cpu") -> FeatureClassifier:
    checkpoint = load_checkpoint(path)
    if checkpoint.config.family != "classifier":
        raise ValueError(f"{path} is a {checkpoint.config.family} checkpoint, not the evaluation classifier")
    model = build_model(checkpoint.config.arch)
    if not isinstance(model, FeatureClassifier):
        known = ", ".join(cls.__name__ for cls in CLASSIFIER_ARCHITECTURES.values())
        raise ValueError(f"{path} holds a {type(model).__name__}; an evaluation classifier is one of {known}")
    model.load_state_dict(checkpoint.weights)
    return model.to(device).eval()


@torch.no_grad()
def features_and_labels(
    classifier: FeatureClassifier, images: torch.Tensor, batch_size: int = 500
) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features [N, D] and predicted labels [N] of images in [-1, 1]."""
    device = next(classifier.parameters()).device
    features, labels = [], []
    for chunk in torch.split(images, batch_size):
        hidden = classifier.features(chunk.to(device))
        features.append(hidden.cpu().double())
        labels.append(classifier.logits(hidden).argmax(1).cpu())
    return torch.cat(features), torch.cat(labels)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) between Gaussians fitted to features [N, D]."""
    a, b = a.double(), b.double()
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        raise ValueError("the classifier features hold NaN or infinite values (are the samples finite?): no FID")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"a Frechet distance needs at least 2 samples on each side, got {len(a)} and {len(b)}")
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)  # [D, D]
    # Tr((S_a S_b)^1/2) = Tr((S_a^1/2 S_b S_a^1/2)^1/2): a symmetric PSD form, so eigvalsh is exact.
    try:
        values, vectors = torch.linalg.eigh(cov_a)
        root_a = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
        trace_root = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    except torch.linalg.LinAlgError as error:  # eigh did not converge: no figure, one line, not a traceback
        raise ValueError(f"the Frechet distance cannot be computed: {str(error).splitlines()[0]}") from error
    mean_term = (a.mean(0) - b.mean(0)).pow(2).sum()
    return float(mean_term + cov_a.trace() + cov_b.trace() - 2 * trace_root)


def class_coverage(labels: torch.Tensor, classes: int = 10) -> float:
    """Entropy of the predicted-label histogram in bits (log2 10 = 3.32 means all digits equally)."""
    counts = torch.bincount(labels, minlength=classes).double()
    probs = counts / counts.sum()
    nonzero = probs[probs > 0]
    return float(-(nonzero * nonzero.log2()).sum())


def _kth_neighbour_radius(points: torch.Tensor, k: int) -> torch.Tensor:
    distances = torch.cdist(points, points)  # [N, N]
    return distances.kthvalue(k + 1, dim=1).values  # k+1: the point itself is at distance 0


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): k-NN balls as manifold estimates."""
    real_radius, fake_radius = _kth_neighbour_radius(real, k), _kth_neighbour_radius(fake, k)
    cross = torch.cdist(fake, real)  # [N_fake, N_real]
    precision = (cross <= real_radius.unsqueeze(0)).any(dim=1).double().mean()
    recall = (fake_radius.unsqueeze(0) >= cross.T).any(dim=1).double().mean()
    return float(precision), float(recall)


@dataclass
class QualityFigures:
    frechet_distance: float
    coverage_bits: float
    precision: float
    recall: float
    n: int
    label_accuracy: float | None = None  # share of samples the classifier reads as the label they were drawn for

    def report(self) -> dict[str, float | int]:
        """The figures as JSON-able values, leaving out what was not measured."""
        return {key: value for key, value in asdict(self).items() if value is not None}


def quality_figures(
    classifier: FeatureClassifier,
    reference: torch.Tensor,
    samples: torch.Tensor,
    labels: torch.Tensor | None = None,
    k: int = 3,
) -> QualityFigures:
    """FD, class coverage, precision/recall of samples against reference images; with the labels [N] the
    samples were asked for, also the share the classifier reads as their label."""
    real_features, _ = features_and_labels(classifier, reference)
    fake_features, fake_labels = features_and_labels(classifier, samples)
    precision, recall = precision_recall(real_features.float(), fake_features.float(), k)
    accuracy = None if labels is None else round((fake_labels.cpu() == labels.cpu()).float().mean().item(), 4)
    return QualityFigures(
        frechet_distance=round(frechet_distance(real_features, fake_features), 3),
        coverage_bits=round(class_coverage(fake_labels), 3),
        precision=round(precision, 3),
        recall=round(recall, 3),
        n=len(samples),
        label_accuracy=accuracy,
    )


def real_data_floor(
    classifier: FeatureClassifier,
    reference: torch.Tensor,
    train_images: torch.Tensor,
    n: int,
    generator: torch.Generator,
) -> dict:
    """The same figures for n real training images against the reference: what a perfect model would get."""
    pick = torch.randperm(len(train_images), generator=generator)[:n]
    return quality_figures(classifier, reference, train_images[pick]).report()


def train_classifier(
    data_dir: str | None,
    out: str,
    epochs: int = 3,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    device_name: str = "auto",
    max_batches: int | None = None,
    dataset: str = "mnist",
    arch_name: str = "digit_classifier",
) -> dict:
    """Train an evaluation classifier of `arch_name` on `dataset`; returns its test accuracy."""
    if arch_name not in CLASSIFIER_ARCHITECTURES:
        raise ValueError(f"unknown classifier {arch_name!r}; known: {', '.join(CLASSIFIER_ARCHITECTURES)}")
    device = pick_device(device_name)
    seed_everything(seed)
    train = load_dataset(dataset, data_dir, "train")
    test = load_dataset(dataset, data_dir, "test")
    arch = {"name": arch_name, "kwargs": {"classes": len(train.classes)}}
    model = build_model(arch).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    log = RunLog(Path(out).with_suffix(".run"))
    clock = Stopwatch()
    total = len(train.images) // batch_size if max_batches is None else max_batches
    for epoch in range(1, epochs + 1):
        bar = log.progress(batches(len(train.images), batch_size, max_batches), total, f"classifier {epoch}/{epochs}")
        for index in bar:
            # Small random shifts make the features robust to the slight misalignment of samples.
            images = torch.roll(train.images[index], shifts=tuple(torch.randint(-2, 3, (2,)).tolist()), dims=(2, 3))
            loss = F.cross_entropy(model(images.to(device)), train.labels[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([model(chunk.to(device)).argmax(1).cpu() for chunk in torch.split(test.images, 1000)])
    accuracy = round(float((predicted == test.labels).double().mean()), 4)
    config = ModelConfig(
        family="classifier",
        arch=arch,
        data={"shape": list(train.shape), "range": [-1.0, 1.0], "dataset": dataset, "classes": train.classes},
        training={"epochs": epochs, "seed": seed, "wall_seconds": clock.seconds(), "device": str(device)},
        metrics={"test_accuracy": accuracy},
    )
    save_checkpoint(out, Checkpoint(config, model.state_dict()))
    log.write({"test_accuracy": accuracy, "wall_seconds": clock.seconds()})
    return {"test_accuracy": accuracy, "out": out}
