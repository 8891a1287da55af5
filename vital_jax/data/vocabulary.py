"""Modality-correct words for how a target contrasts with its surround, and the quality gate's vocabulary checks.

Each modality has its own word for brightness in the picture:
  CT          attenuation: hyperdense (brighter) / hypodense (darker) / isodense
  X-Ray       opacity = brighter (more attenuating, radiopaque) / lucency = darker (radiolucent)
  MRI         signal intensity: hyperintense / hypointense / isointense
  ultrasound  echogenicity: hyperechoic / hypoechoic / isoechoic; anechoic for a black, echo-free interior
  OCT         reflectivity: hyperreflective / hyporeflective
  pathology   staining: denser staining is darker in a bright-field image, paler staining brighter
  dermoscopy  pigmentation; endoscope and fundus photographs: plain brightness
Some target names say which way they contrast ("lung opacity", "pneumothorax", "enhancing tumor", "hypoechoic
nodule"): `implied_contrast`. A sentence must never describe such a target with the opposite word (an opacity
with "greater lucency"); where the measured surround says the opposite (a COVID-19 mask covering both lung
fields is darker than the chest wall around them), the geometry teacher states the quality without a direction.
"""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class ContrastWords:
    """How one modality words brightness. `brighter`/`darker` follow a degree word and precede "than <surround>"."""

    quality: str            # the property compared: "attenuation", "signal intensity"...
    brighter: str
    darker: str
    bright_term: str        # the one-word reading in parentheses ("hyperdense"); "" for none
    dark_term: str
    similar_term: str
    surround: str = "the adjacent tissue"


MODALITY_WORDS = {
    "CT": ContrastWords("attenuation", "higher attenuation", "lower attenuation", "hyperdense", "hypodense",
                        "isodense"),
    "X-Ray": ContrastWords("opacity", "greater opacity", "greater lucency", "more radiopaque", "more radiolucent",
                           ""),
    "MRI": ContrastWords("signal intensity", "higher signal intensity", "lower signal intensity", "hyperintense",
                         "hypointense", "isointense"),
    "ultrasound": ContrastWords("echogenicity", "higher echogenicity", "lower echogenicity", "hyperechoic",
                                "hypoechoic", "isoechoic"),
    "OCT": ContrastWords("reflectivity", "higher reflectivity", "lower reflectivity", "hyperreflective",
                         "hyporeflective", ""),
    "pathology": ContrastWords("staining", "paler staining", "denser staining", "", "", ""),
    "dermoscopy": ContrastWords("pigmentation", "lighter pigmentation", "darker pigmentation", "", "", "",
                                "the surrounding skin"),
    "endoscope": ContrastWords("brightness", "greater brightness", "lower brightness", "", "", "",
                               "the adjacent mucosa"),
    "fundus": ContrastWords("brightness", "greater brightness", "lower brightness", "", "", "",
                            "the adjacent retina"),
}
DEFAULT_WORDS = ContrastWords("brightness", "greater brightness", "lower brightness", "", "", "")
ANECHOIC_LEVEL = 20.0      # mean gray level (0..255) below which an ultrasound interior is black (no echoes)


def words_for(modality: str) -> ContrastWords:
    return MODALITY_WORDS.get(modality, DEFAULT_WORDS)


# ---------------------------------------------------------------------- what a target's name says about contrast
# Name words (lower-case tokens of the target name) that make a target brighter (+1) or darker (-1) than its
# surround, per modality. A "non-" prefix cancels the word ("non-enhancing tumor" implies nothing).
_IMPLIED = {
    "CT": {1: {"opacity", "opacities", "consolidation", "infiltrate", "infiltrates", "infiltration", "pneumonia",
               "covid-19", "covid", "calcification", "calcifications", "calcified", "hyperdense", "atelectasis"},
           -1: {"lucency", "lucent", "pneumothorax", "emphysema", "bulla", "bullae", "hypodense", "air",
                "pneumoperitoneum", "cyst", "cysts", "cystic"}},
    "X-Ray": {1: {"opacity", "opacities", "consolidation", "infiltrate", "infiltrates", "infiltration",
                  "pneumonia", "covid-19", "covid", "calcification", "calcifications", "calcified", "atelectasis",
                  "effusion", "edema", "oedema", "nodule", "mass"},
              -1: {"lucency", "lucent", "pneumothorax", "emphysema", "bulla", "bullae", "pneumoperitoneum"}},
    "MRI": {1: {"hyperintense", "hyperintensity", "enhancing", "enhancement"},
            -1: {"hypointense", "hypointensity"}},
    "ultrasound": {1: {"hyperechoic", "echogenic", "calcification", "calcifications", "calcified", "stone",
                       "calculus"},
                   -1: {"hypoechoic", "anechoic", "cyst", "cysts", "cystic", "fluid", "effusion", "ascites"}},
    "OCT": {1: {"hyperreflective"}, -1: {"hyporeflective"}},
}


def implied_contrast(target: str, modality: str) -> int:
    """+1 when the target's name says it is brighter than its surround on this modality, -1 darker, 0 neither."""
    table = _IMPLIED.get(modality, {})
    tokens = re.findall(r"[a-z0-9]+(?:-[a-z0-9]+)*", target.lower())
    found = set()
    for token in tokens:
        if token.startswith("non-"):
            continue
        found |= {sign for sign, words in table.items() if token in words or token.split("-")[-1] in words}
    return found.pop() if len(found) == 1 else 0


# --------------------------------------------------------------------------------------- the gate's checks
# Words that belong to some modalities only (a "hyperechoic" CT finding is a wrong word, not a finding).
_MODALITY_ONLY = (
    (r"\b(?:hyper|hypo|iso|an)echoic\b|\bechogenic(?:ity)?\b", ("ultrasound",), "echogenicity words"),
    (r"\b(?:hyper|hypo|iso)intens(?:e|ity|ities)\b|\bsignal\s+intensit(?:y|ies)\b", ("MRI",),
     "MRI signal-intensity words"),
    (r"\b(?:hyper|hypo|iso)(?:dense|density|attenuating)\b|\bhounsfield\b", ("CT", "X-Ray"),
     "CT density words"),
    (r"\b(?:radio)?lucen(?:t|cy|cies)\b|\bradio-?opa(?:que|city)\b", ("CT", "X-Ray"), "radiographic words"),
    (r"\bopacit(?:y|ies)\b|\bopacifi(?:ed|cation)\b", ("CT", "X-Ray", "fundus", "OCT"), "opacity"),
    (r"\b(?:hyper|hypo)reflective\b|\breflectivity\b", ("OCT", "ultrasound", "fundus"), "reflectivity words"),
    (r"\b(?:eosinophilic|basophilic|ha?ematoxylin|eosin)\b", ("pathology",), "staining words"),
)
_MODALITY_ONLY = tuple((re.compile(p, re.IGNORECASE), m, what) for p, m, what in _MODALITY_ONLY)
# Words that state a direction of contrast, per modality: (brighter words, darker words).
_DIRECTION_WORDS = {
    "CT": (r"hyperdense|hyperattenuating|higher\s+(?:attenuation|density)|radiopaque|radio-opaque",
           r"hypodense|hypoattenuating|lower\s+(?:attenuation|density)|(?:radio)?lucen(?:t|cy|cies)"),
    "X-Ray": (r"radiopaque|radio-opaque|more\s+opaque|(?:greater|increased)\s+opacity|opacities|opacification"
              r"|hyperdense|(?:an|one)\s+opacity",
              r"(?:radio)?lucen(?:t|cy|cies)|hypodense|less\s+opaque|(?:lower|decreased)\s+opacity"),
    "MRI": (r"hyperintens(?:e|ity)|(?:higher|high|increased)\s+signal", r"hypointens(?:e|ity)|(?:lower|low|"
            r"decreased)\s+signal|signal\s+voids?|flow\s+voids?"),
    "ultrasound": (r"hyperechoic|echogenic(?!ity)|(?:higher|increased)\s+echogenicity|more\s+echogenic",
                   r"hypoechoic|anechoic|(?:lower|decreased)\s+echogenicity|less\s+echogenic"),
    "OCT": (r"hyperreflective|(?:higher|increased)\s+reflectivity", r"hyporeflective|(?:lower|decreased)\s+"
            r"reflectivity"),
}
_NEGATION_RE = re.compile(r"\b(?:no|not|without|nor|neither|absent|lacks?|lacking|free\s+of)\b(?:\s+\S+){0,2}\s*$",
                          re.IGNORECASE)


def vocabulary_problems(text: str, modality: str, target: str = "") -> list[str]:
    """Wrong-modality contrast words in `text`, and words that contradict the target's own name (a "lung
    opacity" with "lucency"); a negated word ("no lucency") is not a contradiction. Unknown modality: none."""
    out = []
    for regex, modalities, what in _MODALITY_ONLY:
        if modality and modality not in modalities:
            out += [f"'{m.group(0)}' ({what} do not describe a {modality} image)" for m in regex.finditer(text)]
    sign = implied_contrast(target, modality) if target else 0
    if sign and modality in _DIRECTION_WORDS:
        opposite = _DIRECTION_WORDS[modality][0 if sign < 0 else 1]
        for match in re.finditer(rf"\b(?:{opposite})\b", text, re.IGNORECASE):
            if not _NEGATION_RE.search(text[:match.start()]):
                kind = "brighter" if sign > 0 else "darker"
                out.append(f"'{match.group(0)}' contradicts the {target}, which is {kind} on {modality} by name")
    return out
