"""Folder layouts of the domain-generalisation benchmarks the paper evaluates on (docs/ALGORITHM.md §5).

Each preset names the domain folders and maps class-folder names to prompt names, as the data
is distributed for DomainBed (PACS, VLCS, OfficeHome) and by the domain-adaptation releases
(ImageCLEF-DA's numbered class folders, VisDA-2017's train = synthetic / validation = real
splits). Any other ImageFolder tree in root/<domain>/<class>/ works without a preset.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DatasetPreset:
    domains: tuple[str, ...]
    classes: tuple[str, ...]  # prompt names
    folders: dict[str, str] = field(default_factory=dict)  # class-folder name -> prompt name, where they differ


_IMAGECLEF = ("aeroplane", "bike", "bird", "boat", "bottle", "bus", "car", "dog", "horse", "monitor", "motorbike", "people")
_OFFICEHOME = (
    "alarm clock", "backpack", "batteries", "bed", "bike", "bottle", "bucket", "calculator", "calendar", "candles",
    "chair", "clipboards", "computer", "couch", "curtains", "desk lamp", "drill", "eraser", "exit sign", "fan",
    "file cabinet", "flipflops", "flowers", "folder", "fork", "glasses", "hammer", "helmet", "kettle", "keyboard",
    "knives", "lamp shade", "laptop", "marker", "monitor", "mop", "mouse", "mug", "notebook", "oven", "pan",
    "paper clip", "pen", "pencil", "postit notes", "printer", "push pin", "radio", "refrigerator", "ruler",
    "scissors", "screwdriver", "shelf", "sink", "sneakers", "soda", "speaker", "spoon", "tv", "table", "telephone",
    "toothbrush", "toys", "trash can", "webcam",
)

PRESETS: dict[str, DatasetPreset] = {
    "pacs": DatasetPreset(("art_painting", "cartoon", "photo", "sketch"),
                          ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")),
    "vlcs": DatasetPreset(("Caltech101", "LabelMe", "SUN09", "VOC2007"), ("bird", "car", "chair", "dog", "person")),
    # DomainBed folders are e.g. Alarm_Clock, Exit_Sign: they match the prompt names by class_key
    "officehome": DatasetPreset(("Art", "Clipart", "Product", "Real World"), _OFFICEHOME),
    # ImageCLEF-DA: c (Caltech-256), i (ImageNet), p (Pascal VOC), class folders 0..11
    "imageclef": DatasetPreset(("c", "i", "p"), _IMAGECLEF, {str(i): c for i, c in enumerate(_IMAGECLEF)}),
    "visda2017": DatasetPreset(("train", "validation"), ("aeroplane", "bicycle", "bus", "car", "horse", "knife",
                                                         "motorcycle", "person", "plant", "skateboard", "train", "truck")),
}
