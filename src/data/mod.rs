//! Datasets, encoders, augmentation and the prefetching loader.
