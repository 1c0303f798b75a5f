"""Plain data passed between extraction, the LLM stages and the job worker.

Nothing here knows about HTTP or the database: the worker loads rows, builds a
``CaseInput``, calls ``pipeline.stages.run_analysis`` in a thread and writes the
``AnalysisResult`` back in one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from medmitra.clinical.labs import LabRow, LabStatus  # noqa: F401  (re-exported)

Category = Literal["lab", "radiology"]


@dataclass
class ExtractedFile:
    file_id: str
    category: Category
    file_name: str          # display name only; never a path
    mime: str
    text: str | None = None                 # stored in case_files.text_data
    pages: list[str] = field(default_factory=list)
    lab_rows: list[LabRow] = field(default_factory=list)
    # Result-like lines (a name, a number, a range or unit) that did not become rows.
    lab_lines_unparsed: int = 0
    # A radiology report's sections as written: {"findings", "impression"} (PDF reports).
    report_sections: dict[str, str] = field(default_factory=dict)
    ocr_used: bool = False
    # Normalised RGB image (PIL.Image.Image) for a vision model, EXIF removed; or None.
    image: Any = None
    # Non-identifying DICOM tags (modality, body part, study description, dates ...).
    dicom_tags: dict[str, str] = field(default_factory=dict)
    # Human-readable notes about extraction ("no text layer, OCR used", errors ...).
    notes: list[str] = field(default_factory=list)


@dataclass
class AnalysisOptions:
    include_differential: bool = True
    include_treatment: bool = True
    include_lab_interpretation: bool = True
    include_imaging: bool = True
    confidence_threshold: float | None = None


@dataclass
class CaseInput:
    case_id: str
    patient_name: str
    patient_age: int
    patient_gender: str
    doctor_notes: str | None
    files: list[ExtractedFile]
    options: AnalysisOptions = field(default_factory=AnalysisOptions)
    # The job's attempt number (1 = first); retries continue the seed/temperature sequence.
    attempt: int = 1


@dataclass
class StageMetrics:
    stage: str
    duration_s: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 1
    # Prompt tokens reused from the KV cache, and seconds spent reading the prompt: with
    # duration_s they split a stage into prompt reading and generation.
    cached_tokens: int = 0
    prompt_eval_s: float = 0.0
    # Seconds the model spent generating (Usage.generate_s summed; 0.0 if unknown).
    generate_s: float = 0.0
    # ok | retried (an answer was accepted after a retry) | abstained (no acceptable
    # answer: the stage's fields say "not available"); reason says why.
    status: str = "ok"
    reason: str | None = None

    def abstain(self, reason: str) -> None:
        self.status = "abstained"
        self.reason = reason if not self.reason else f"{self.reason}; {reason}"


@dataclass
class AnalysisResult:
    # file_id -> JSON-able dict stored (as a JSON string) in case_files.ai_summary.
    file_summaries: dict[str, dict[str, Any]]
    # The nested ``insights`` shape of the API contract (section 3), minus generated_at.
    insights: dict[str, Any]
    stages: list[StageMetrics]
    # {"name", "file", "quantization", "sha256"} of the model that made it.
    model: dict[str, Any]


class StageError(Exception):
    """The model runtime failed (infrastructure, not prose); the job may retry."""

    def __init__(self, stage: str, reason: str):
        self.stage = stage
        self.reason = reason
        super().__init__(f"{stage}: {reason}")


class Cancelled(Exception):
    """The job was cancelled (case deleted, shutdown) between stages."""


# progress(stage_name, fraction_done_0_to_1)
ProgressFn = Callable[[str, float], None]
# should_stop() -> True when the run must end (raises Cancelled at the next checkpoint)
StopFn = Callable[[], bool]

STAGES = ("extract", "lab_analysis", "radiology_analysis", "case_summary", "soap_note",
          "diagnosis", "differential", "recommendations", "compile")
