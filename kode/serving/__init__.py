"""Serving: verified SavedModels with kode's signatures (:mod:`kode.serving.export`), their
versioned publishing in the TensorFlow Serving layout (:mod:`kode.serving.publish`), the
in-graph input preprocessing (:mod:`kode.serving.preprocessing`) and prediction on image
files (:mod:`kode.serving.predict`)."""

from kode.serving.export import ExportResult, export_model, verify_export
from kode.serving.predict import Prediction, predict_files
from kode.serving.publish import check_export_dir, load_metadata

__all__ = ["ExportResult", "Prediction", "check_export_dir", "export_model", "load_metadata",
           "predict_files", "verify_export"]
