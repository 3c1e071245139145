//! Weft's sidecar injection webhook. Not built yet: the injection issue adds the pure
//! `inject()` and the AdmissionReview server here.
