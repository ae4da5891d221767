"""The files a pretraining, distillation or fine-tuning run leaves in its folder, named once.

Why: the trainer writes them and others read them without importing the trainer (the pipeline's
stages stay torch-free, the weight loader finds a run folder's backbone by this name).
"""

BACKBONE_FILE = "backbone.safetensors"  # the released backbone: the teacher's (pretraining) or the student's
SUMMARY_FILE = "summary.json"  # the run's figures: steps, history, final scores, where the backbone is
HEADS_FILE = "heads.safetensors"  # the released network's DINO/iBOT heads (and centres): to continue training from
CLASSIFIER_FILE = "classifier.safetensors"  # a fine-tuned backbone's linear classifier, its classes in the metadata
