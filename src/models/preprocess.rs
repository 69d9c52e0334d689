//! Reading a checkpoint's `preprocessor_config.json`; the processing itself lives in the
//! `caption-images` crate.

use std::path::Path;

pub use caption_images::preprocess::*;

use super::{read_folder_file, ModelError};

/// The image processor a checkpoint folder prescribes.
pub fn load(folder: &Path) -> Result<ImageProcessor, ModelError> {
    let name = "preprocessor_config.json";
    ImageProcessor::from_json(&read_folder_file(folder, name)?)
        .map_err(|e| ModelError::Config(format!("{}/{name}: {e}", folder.display())))
}
