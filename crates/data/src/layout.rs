//! Dataset layouts as users already have them on disk, and the pairing of images with masks.
//!
//! Three layouts are recognised (see [`Layout`]); [`discover`] detects the layout of a folder
//! (or takes the one the user chose with [`LayoutChoice`]) and returns a [`Discovery`]: the
//! [`SamplePair`]s that were matched plus every pairing problem found, each naming its file. Nothing
//! is decoded here, so discovery of a thousand pairs is a couple of directory listings.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::error::{DataError, Result};

/// File extensions (lower case) that the image decoder reads.
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "gif", "bmp", "tif", "tiff"];

/// Optional suffixes of a mask's stem in the GenSeg reference layout, tried in this order after the
/// bare stem (ISIC uses `_segmentation`, PH2 `_lesion`, NLM-SZ and breast `_mask`; spec §5).
pub const GENSEG_MASK_SUFFIXES: &[&str] = &["_mask", "_segmentation", "_lesion"];

/// A dataset layout on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// `images/<id>.<ext>` + `masks/<id>.<ext>`, same stem (`index.csv` optional and ignored).
    Folder,
    /// The GenSeg reference layout: `Images/<id>.<ext>` + `Masks/<id>[suffix].<ext>`, where the
    /// suffix is empty or one of [`GENSEG_MASK_SUFFIXES`]; GIF masks are fine.
    GenSeg,
    /// nnU-Net v2 raw: `dataset.json`, `imagesTr/<case>_0000<file_ending>`,
    /// `labelsTr/<case><file_ending>`; one channel file per case.
    NnUnet,
}

impl Layout {
    /// All layouts, in detection order.
    pub const ALL: [Layout; 3] = [Layout::Folder, Layout::GenSeg, Layout::NnUnet];

    /// The folder names (image folder, mask folder) of this layout.
    pub fn folders(self) -> (&'static str, &'static str) {
        match self {
            Layout::Folder => ("images", "masks"),
            Layout::GenSeg => ("Images", "Masks"),
            Layout::NnUnet => ("imagesTr", "labelsTr"),
        }
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layout::Folder => "folder",
            Layout::GenSeg => "genseg",
            Layout::NnUnet => "nnunet",
        })
    }
}

/// The layout to use for a folder: detected, or chosen by the user when detection is ambiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayoutChoice {
    /// Detect the layout; an error if none or several match.
    #[default]
    Auto,
    /// [`Layout::Folder`].
    Folder,
    /// [`Layout::GenSeg`].
    GenSeg,
    /// [`Layout::NnUnet`].
    NnUnet,
}

impl FromStr for LayoutChoice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(LayoutChoice::Auto),
            "folder" => Ok(LayoutChoice::Folder),
            "genseg" => Ok(LayoutChoice::GenSeg),
            "nnunet" => Ok(LayoutChoice::NnUnet),
            _ => Err(format!(
                "unknown layout {s:?} (expected auto, folder, genseg or nnunet)"
            )),
        }
    }
}

impl fmt::Display for LayoutChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LayoutChoice::Auto => f.write_str("auto"),
            LayoutChoice::Folder => Layout::Folder.fmt(f),
            LayoutChoice::GenSeg => Layout::GenSeg.fmt(f),
            LayoutChoice::NnUnet => Layout::NnUnet.fmt(f),
        }
    }
}

/// One labelled example on disk: its id and the paths of its image and mask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SamplePair {
    /// The id (the image stem; the nnU-Net case name).
    pub id: String,
    /// Path of the image file.
    pub image: PathBuf,
    /// Path of the mask (label map) file.
    pub mask: PathBuf,
}

/// What an nnU-Net `dataset.json` declares that the rest of the crate needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NnUnetInfo {
    /// Path of `dataset.json`.
    pub dataset_json: PathBuf,
    /// Label values by name (`background` included); region labels contribute each of their values.
    pub labels: BTreeMap<String, Vec<u16>>,
    /// The file ending of every image and label file, e.g. `.png`.
    pub file_ending: String,
    /// `numTraining`, when the file declares it: the number of labelled training cases.
    pub num_training: Option<u64>,
}

impl NnUnetInfo {
    /// All declared label values.
    pub fn label_values(&self) -> BTreeSet<u16> {
        self.labels.values().flatten().copied().collect()
    }
}

/// The result of pairing a dataset folder: matched pairs (sorted by id) and per-file problems.
#[derive(Debug)]
pub struct Discovery {
    /// The dataset folder.
    pub root: PathBuf,
    /// The layout used.
    pub layout: Layout,
    /// Matched pairs, sorted by id.
    pub pairs: Vec<SamplePair>,
    /// Pairing problems (missing mask, unmatched mask, duplicate id, ...), each naming its file.
    pub problems: Vec<DataError>,
    /// The parsed `dataset.json` for [`Layout::NnUnet`].
    pub nnunet: Option<NnUnetInfo>,
}

impl Discovery {
    /// The pairs, or the first problem as an error; an empty dataset is an error too.
    pub fn into_pairs(mut self) -> Result<Vec<SamplePair>> {
        if !self.problems.is_empty() {
            return Err(self.problems.swap_remove(0));
        }
        if self.pairs.is_empty() {
            return Err(DataError::EmptyDataset { dir: self.root });
        }
        Ok(self.pairs)
    }

    /// The ids of the matched pairs, sorted.
    pub fn ids(&self) -> Vec<String> {
        self.pairs.iter().map(|p| p.id.clone()).collect()
    }
}

/// Names of the sub-folders of `dir` (exact spelling, so `images` and `Images` stay distinct even on
/// a case-insensitive file system).
fn subfolder_names(dir: &Path) -> Result<BTreeSet<String>> {
    let entries = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
    let mut names = BTreeSet::new();
    for entry in entries {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        if entry.path().is_dir() {
            names.insert(entry.file_name().to_string_lossy().into_owned());
        }
    }
    Ok(names)
}

/// Detects the layout of `dir`: an error naming the folder when none or several layouts match.
pub fn detect_layout(dir: &Path) -> Result<Layout> {
    let subfolders = subfolder_names(dir)?;
    let has = |name: &str| subfolders.contains(name);
    let matches: Vec<Layout> = Layout::ALL
        .into_iter()
        .filter(|layout| {
            let (images, masks) = layout.folders();
            has(images)
                && has(masks)
                && (*layout != Layout::NnUnet || dir.join("dataset.json").is_file())
        })
        .collect();
    match matches.as_slice() {
        [] => Err(DataError::NoLayout {
            dir: dir.to_path_buf(),
        }),
        [one] => Ok(*one),
        several => Err(DataError::AmbiguousLayout {
            dir: dir.to_path_buf(),
            candidates: several
                .iter()
                .map(|l| {
                    let (i, m) = l.folders();
                    format!("{l} ({i}/ + {m}/)")
                })
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// Image files of a folder as (file name without `ending`, path), sorted by name. Hidden files and
/// files that do not end in `ending` (or, when `ending` is `None`, in an image extension) are skipped.
fn list_files(
    dir: &Path,
    ending: Option<&str>,
    problems: &mut Vec<DataError>,
) -> Result<Vec<(String, PathBuf)>> {
    let entries = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        // A link that resolves to nothing (dangling, or a loop) is reported, not skipped:
        // it is almost always a case the user meant to include.
        if entry.file_type().is_ok_and(|t| t.is_symlink()) {
            if let Err(e) = std::fs::metadata(&path) {
                problems.push(DataError::InvalidLayout {
                    path,
                    message: format!("symbolic link leads nowhere (dangling, or a loop): {e}"),
                });
                continue;
            }
        }
        if !path.is_file() {
            continue;
        }
        let stem = match ending {
            Some(ending) => name.strip_suffix(ending).map(str::to_owned),
            None => {
                let ext = path
                    .extension()
                    .map(|e| e.to_string_lossy().to_ascii_lowercase());
                match (ext, path.file_stem()) {
                    (Some(ext), Some(stem)) if IMAGE_EXTENSIONS.contains(&ext.as_str()) => {
                        Some(stem.to_string_lossy().into_owned())
                    }
                    _ => None,
                }
            }
        };
        if let Some(stem) = stem {
            files.push((stem, path));
        }
    }
    files.sort_by(|a, b| a.1.cmp(&b.1));
    Ok(files)
}

/// Builds an id -> path map, recording a problem for each repeated id (e.g. `a.png` and `a.jpg`).
fn index_by_id(
    files: Vec<(String, PathBuf)>,
    problems: &mut Vec<DataError>,
) -> BTreeMap<String, PathBuf> {
    let mut map: BTreeMap<String, PathBuf> = BTreeMap::new();
    for (id, path) in files {
        if let Some(other) = map.get(&id) {
            problems.push(DataError::DuplicateId {
                path,
                other: other.clone(),
                id,
            });
        } else {
            map.insert(id, path);
        }
    }
    map
}

/// Pairs images with masks. `mask_ids(image_id)` lists the mask ids that may belong to an image.
fn pair(
    images: BTreeMap<String, PathBuf>,
    masks: BTreeMap<String, PathBuf>,
    mask_ids: impl Fn(&str) -> Vec<String>,
    expected: impl Fn(&str) -> String,
    problems: &mut Vec<DataError>,
) -> Vec<SamplePair> {
    let mut claimed = BTreeSet::new();
    let mut pairs = Vec::new();
    for (id, image) in images {
        let found: Vec<&String> = mask_ids(&id)
            .into_iter()
            .filter_map(|m| masks.get_key_value(&m).map(|(k, _)| k))
            .collect();
        match found.as_slice() {
            [] => problems.push(DataError::MissingMask {
                expected: expected(&id),
                image,
            }),
            [mask_id] => {
                claimed.insert((*mask_id).clone());
                pairs.push(SamplePair {
                    mask: masks[*mask_id].clone(),
                    id,
                    image,
                });
            }
            several => {
                for m in several {
                    claimed.insert((*m).clone());
                }
                problems.push(DataError::InvalidLayout {
                    message: format!(
                        "several masks match this image: {}",
                        several
                            .iter()
                            .map(|m| masks[*m].display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    path: image,
                });
            }
        }
    }
    for (id, mask) in masks {
        if !claimed.contains(&id) {
            problems.push(DataError::UnmatchedMask { mask });
        }
    }
    pairs
}

/// Discovers the pairs of a dataset folder in the chosen (or detected) layout.
///
/// Fails only when the folder itself cannot be used (unreadable, no or ambiguous layout, invalid
/// `dataset.json`); problems with single files are collected in [`Discovery::problems`].
pub fn discover(dir: &Path, choice: LayoutChoice) -> Result<Discovery> {
    if !dir.is_dir() {
        return Err(DataError::io(
            dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "dataset folder not found"),
        ));
    }
    let layout = match choice {
        LayoutChoice::Auto => detect_layout(dir)?,
        LayoutChoice::Folder => Layout::Folder,
        LayoutChoice::GenSeg => Layout::GenSeg,
        LayoutChoice::NnUnet => Layout::NnUnet,
    };
    let (image_dir, mask_dir) = layout.folders();
    let (image_dir, mask_dir) = (dir.join(image_dir), dir.join(mask_dir));
    for folder in [&image_dir, &mask_dir] {
        if !folder.is_dir() {
            return Err(DataError::InvalidLayout {
                path: folder.clone(),
                message: format!("folder required by the {layout} layout is missing"),
            });
        }
    }
    let mut problems = Vec::new();
    let mut nnunet = None;
    let pairs = match layout {
        Layout::Folder => {
            let images = index_by_id(list_files(&image_dir, None, &mut problems)?, &mut problems);
            let masks = index_by_id(list_files(&mask_dir, None, &mut problems)?, &mut problems);
            let md = mask_dir.clone();
            pair(
                images,
                masks,
                |id| vec![id.to_owned()],
                move |id| format!("{}/{id}.<ext>", md.display()),
                &mut problems,
            )
        }
        Layout::GenSeg => {
            let images = index_by_id(list_files(&image_dir, None, &mut problems)?, &mut problems);
            let masks = index_by_id(list_files(&mask_dir, None, &mut problems)?, &mut problems);
            let md = mask_dir.clone();
            pair(
                images,
                masks,
                |id| {
                    std::iter::once(id.to_owned())
                        .chain(GENSEG_MASK_SUFFIXES.iter().map(|s| format!("{id}{s}")))
                        .collect()
                },
                move |id| {
                    format!(
                        "{}/{id}[{}].<ext>",
                        md.display(),
                        GENSEG_MASK_SUFFIXES.join("|")
                    )
                },
                &mut problems,
            )
        }
        Layout::NnUnet => {
            let info = read_dataset_json(&dir.join("dataset.json"))?;
            let mut images = Vec::new();
            for (name, path) in list_files(&image_dir, Some(&info.file_ending), &mut problems)? {
                match name.strip_suffix("_0000") {
                    Some(case) => images.push((case.to_owned(), path)),
                    None => problems.push(DataError::InvalidLayout {
                        path,
                        message: "image file name must be <case>_0000 followed by the file ending (dataset.json declares one channel)".into(),
                    }),
                }
            }
            let images = index_by_id(images, &mut problems);
            let masks = index_by_id(
                list_files(&mask_dir, Some(&info.file_ending), &mut problems)?,
                &mut problems,
            );
            if let Some(n) = info.num_training.filter(|&n| n != masks.len() as u64) {
                problems.push(DataError::InvalidLayout {
                    path: info.dataset_json.clone(),
                    message: format!(
                        "numTraining is {n} but {} holds {} label file(s)",
                        mask_dir.display(),
                        masks.len()
                    ),
                });
            }
            let (md, ending) = (mask_dir.clone(), info.file_ending.clone());
            let pairs = pair(
                images,
                masks,
                |id| vec![id.to_owned()],
                move |id| format!("{}/{id}{ending}", md.display()),
                &mut problems,
            );
            nnunet = Some(info);
            pairs
        }
    };
    Ok(Discovery {
        root: dir.to_path_buf(),
        layout,
        pairs,
        problems,
        nnunet,
    })
}

/// Reads the parts of an nnU-Net v2 `dataset.json` this crate uses, refusing what it cannot load.
pub fn read_dataset_json(path: &Path) -> Result<NnUnetInfo> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| DataError::Json {
            path: path.to_path_buf(),
            source,
        })?;
    let invalid = |message: String| DataError::InvalidLayout {
        path: path.to_path_buf(),
        message,
    };
    // A field that is absent and one of the wrong type get different messages.
    let field = |key: &str, kind: &str| {
        json.get(key)
            .ok_or_else(|| invalid(format!("missing field {key:?} ({kind})")))
            .map(|v| {
                (
                    v,
                    invalid(format!("field {key:?} must be {kind}, found {v}")),
                )
            })
    };
    let file_ending = match field("file_ending", "a string")? {
        (serde_json::Value::String(s), _) => s.clone(),
        (_, wrong) => return Err(wrong),
    };
    let ext = file_ending.trim_start_matches('.').to_ascii_lowercase();
    if !IMAGE_EXTENSIONS.contains(&ext.as_str()) {
        return Err(invalid(format!(
            "file_ending {file_ending:?} is not a 2D image format this crate decodes ({})",
            IMAGE_EXTENSIONS.join(", ")
        )));
    }
    // nnU-Net v2 says "channel_names"; v1-converted files still say "modality".
    let channel_key = match json.get("channel_names") {
        None if json.get("modality").is_some() => "modality",
        _ => "channel_names",
    };
    let channels = match field(channel_key, "an object")? {
        (serde_json::Value::Object(o), _) => o,
        (_, wrong) => return Err(wrong),
    };
    if channels.len() != 1 {
        return Err(invalid(format!(
            "{} channel files per case declared in channel_names; only one (_0000, grayscale or RGB) is supported",
            channels.len()
        )));
    }
    let labels_json = match field("labels", "an object of label name: value")? {
        (serde_json::Value::Object(o), _) => o,
        (_, wrong) => return Err(wrong),
    };
    let num_training = match json.get("numTraining") {
        None => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| {
            invalid(format!(
                "field \"numTraining\" must be a non-negative integer, found {v}"
            ))
        })?),
    };
    let mut labels = BTreeMap::new();
    for (name, value) in labels_json {
        let as_label = |v: &serde_json::Value| {
            v.as_u64()
                .and_then(|v| u16::try_from(v).ok())
                .ok_or_else(|| {
                    invalid(format!("label {name:?} has a value that is not a u16: {v}"))
                })
        };
        let values = match value {
            serde_json::Value::Array(items) => {
                items.iter().map(as_label).collect::<Result<Vec<_>>>()?
            }
            v => vec![as_label(v)?],
        };
        labels.insert(name.clone(), values);
    }
    Ok(NnUnetInfo {
        dataset_json: path.to_path_buf(),
        labels,
        file_ending,
        num_training,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"x").unwrap();
    }

    #[test]
    fn folder_layout_pairs_same_stem_and_reports_orphans() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for f in ["images/b.png", "images/a.png", "masks/a.png", "masks/b.png"] {
            touch(&d.join(f));
        }
        touch(&d.join("images/c.jpg"));
        touch(&d.join("masks/z.png"));
        touch(&d.join("images/.DS_Store"));
        touch(&d.join("index.csv"));
        let found = discover(d, LayoutChoice::Auto).unwrap();
        assert_eq!(found.layout, Layout::Folder);
        assert_eq!(found.ids(), vec!["a", "b"]);
        assert_eq!(found.problems.len(), 2);
        assert!(
            matches!(&found.problems[0], DataError::MissingMask { image, .. } if image.ends_with("images/c.jpg"))
        );
        assert!(
            matches!(&found.problems[1], DataError::UnmatchedMask { mask } if mask.ends_with("masks/z.png"))
        );
        let err = found.into_pairs().unwrap_err().to_string();
        assert!(
            err.contains("c.jpg") && err.contains("missing mask"),
            "{err}"
        );
    }

    #[test]
    fn genseg_layout_accepts_suffixes_and_gif() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for f in [
            "Images/ISIC_1.jpg",
            "Masks/ISIC_1_segmentation.png",
            "Images/IMD2.bmp",
            "Masks/IMD2_lesion.bmp",
            "Images/case.png",
            "Masks/case_mask.gif",
            "Images/plain.png",
            "Masks/plain.gif",
        ] {
            touch(&d.join(f));
        }
        let found = discover(d, LayoutChoice::Auto).unwrap();
        assert_eq!(found.layout, Layout::GenSeg);
        assert!(found.problems.is_empty(), "{:?}", found.problems);
        let pairs = found.into_pairs().unwrap();
        let masks: Vec<_> = pairs
            .iter()
            .map(|p| p.mask.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            masks,
            [
                "IMD2_lesion.bmp",
                "ISIC_1_segmentation.png",
                "case_mask.gif",
                "plain.gif"
            ]
        );
    }

    #[test]
    fn genseg_layout_flags_two_masks_for_one_image() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for f in ["Images/a.png", "Masks/a.png", "Masks/a_mask.png"] {
            touch(&d.join(f));
        }
        let found = discover(d, LayoutChoice::GenSeg).unwrap();
        assert_eq!(found.problems.len(), 1);
        let msg = found.problems[0].to_string();
        assert!(
            msg.contains("several masks") && msg.contains("a_mask.png"),
            "{msg}"
        );
    }

    fn write_nnunet(d: &Path, channel_names: &str, ending: &str) {
        std::fs::create_dir_all(d).unwrap();
        std::fs::write(
            d.join("dataset.json"),
            format!(
                r#"{{"channel_names": {channel_names}, "labels": {{"background": 0, "lung": 1, "both": [1, 2]}}, "numTraining": 2, "file_ending": "{ending}"}}"#
            ),
        )
        .unwrap();
    }

    #[test]
    fn nnunet_layout_reads_dataset_json_and_pairs_cases() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_nnunet(d, r#"{"0": "xray"}"#, ".png");
        for f in [
            "imagesTr/c1_0000.png",
            "labelsTr/c1.png",
            "imagesTr/c2_0000.png",
            "labelsTr/c2.png",
            "imagesTr/c3_0000.png",
        ] {
            touch(&d.join(f));
        }
        let found = discover(d, LayoutChoice::Auto).unwrap();
        assert_eq!(found.layout, Layout::NnUnet);
        assert_eq!(found.ids(), vec!["c1", "c2"]);
        assert_eq!(found.problems.len(), 1);
        assert!(found.problems[0].to_string().contains("c3_0000.png"));
        let info = found.nnunet.unwrap();
        assert_eq!(info.label_values(), BTreeSet::from([0, 1, 2]));
        assert_eq!(info.file_ending, ".png");
    }

    #[cfg(unix)]
    #[test]
    fn dangling_links_and_link_loops_are_reported_not_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for f in ["images/a.png", "masks/a.png", "images/b.png"] {
            touch(&d.join(f));
        }
        std::os::unix::fs::symlink(d.join("gone.png"), d.join("masks/b.png")).unwrap();
        std::os::unix::fs::symlink(d.join("images/c.png"), d.join("images/c.png")).unwrap();
        let found = discover(d, LayoutChoice::Folder).unwrap();
        assert_eq!(found.ids(), vec!["a"]);
        let messages: Vec<String> = found.problems.iter().map(|p| p.to_string()).collect();
        for name in ["masks/b.png", "images/c.png"] {
            assert!(
                messages
                    .iter()
                    .any(|m| m.contains(name) && m.contains("symbolic link leads nowhere")),
                "{name}: {messages:?}"
            );
        }
    }

    #[test]
    fn nnunet_flags_a_num_training_mismatch_and_names_wrong_typed_fields() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_nnunet(d, r#"{"0": "xray"}"#, ".png");
        for f in ["imagesTr/c1_0000.png", "labelsTr/c1.png"] {
            touch(&d.join(f));
        }
        let found = discover(d, LayoutChoice::Auto).unwrap();
        assert_eq!(found.problems.len(), 1);
        let msg = found.problems[0].to_string();
        assert!(
            msg.contains("dataset.json")
                && msg.contains("numTraining is 2")
                && msg.contains("1 label file"),
            "{msg}"
        );
        let json = d.join("dataset.json");
        for (text, expected) in [
            (
                r#"{"channel_names": {"0": "x"}, "labels": ["background", "lung"], "file_ending": ".png"}"#,
                "field \"labels\" must be an object",
            ),
            (
                r#"{"channel_names": {"0": "x"}, "file_ending": ".png"}"#,
                "missing field \"labels\" (an object of label name: value)",
            ),
            (
                r#"{"channel_names": {"0": "x"}, "labels": {"background": 0}, "file_ending": 5}"#,
                "field \"file_ending\" must be a string, found 5",
            ),
            (
                r#"{"channel_names": {"0": "x"}, "labels": {"background": 0}, "numTraining": "9", "file_ending": ".png"}"#,
                "\"numTraining\" must be a non-negative integer, found \"9\"",
            ),
        ] {
            std::fs::write(&json, text).unwrap();
            let err = read_dataset_json(&json).unwrap_err().to_string();
            assert!(
                err.contains("dataset.json") && err.contains(expected),
                "{err}"
            );
        }
    }

    #[test]
    fn nnunet_refuses_multichannel_and_volumes() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_nnunet(d, r#"{"0": "T1", "1": "T2"}"#, ".png");
        let err = read_dataset_json(&d.join("dataset.json"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("dataset.json") && err.contains("2 channel files"),
            "{err}"
        );
        write_nnunet(d, r#"{"0": "CT"}"#, ".nii.gz");
        let err = read_dataset_json(&d.join("dataset.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(".nii.gz"), "{err}");
    }

    #[test]
    fn detection_is_ambiguous_or_absent_with_clear_messages() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let err = detect_layout(d).unwrap_err().to_string();
        assert!(err.contains("no dataset layout"), "{err}");
        for f in ["images", "masks", "Images", "Masks"] {
            std::fs::create_dir_all(d.join(f)).unwrap();
        }
        let err = detect_layout(d).unwrap_err().to_string();
        assert!(
            err.contains("ambiguous") && err.contains("--layout"),
            "{err}"
        );
        // The user's choice overrides detection.
        assert_eq!(
            discover(d, LayoutChoice::GenSeg).unwrap().layout,
            Layout::GenSeg
        );
    }

    #[test]
    fn layout_choice_round_trips_through_strings() {
        for c in [
            LayoutChoice::Auto,
            LayoutChoice::Folder,
            LayoutChoice::GenSeg,
            LayoutChoice::NnUnet,
        ] {
            assert_eq!(c.to_string().parse::<LayoutChoice>().unwrap(), c);
        }
        assert!("voc".parse::<LayoutChoice>().is_err());
    }
}
