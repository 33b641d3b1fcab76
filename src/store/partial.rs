//! What the stores without create-only puts (WebDAV, SFTP) share: the temporary names their uploads
//! are written under before they are moved onto their keys, a listing that walks folder by folder,
//! the shapes of their answers, and [`Temporaries`], which lists the temporary names (hidden from
//! every other listing) so that `prune` can delete the ones a killed upload left.
//!
//! Keeping them in one place keeps the temporary-name convention (docs/FORMAT.md) one convention.

use std::future::Future;

use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{GetOptions, GetResult, GetResultPayload, ObjectMeta, PutResult};

/// What the temporary name of an upload adds to its key's name (listings hide such names).
pub(crate) const PARTIAL: &str = ".immich-backup-partial-";

/// A store that writes through temporary names: lists them (uploads under way, or left by killed
/// ones), with their sizes and last-modified times.
pub(crate) trait Temporaries: Send + Sync {
    fn temporaries(&self) -> BoxStream<'static, object_store::Result<ObjectMeta>>;
}

/// A fresh temporary name for `location`, in the same folder.
pub(crate) fn partial_name(location: &Path) -> Path {
    let name = location.filename().unwrap_or("object");
    let tmp = format!("{name}{PARTIAL}{}", hex::encode(rand::random::<[u8; 8]>()));
    match location.parts().count() {
        0 | 1 => Path::from(tmp),
        _ => {
            let parent: Vec<_> = location.parts().collect();
            let mut p = Path::from_iter(parent[..parent.len() - 1].iter().cloned());
            p = p.join(tmp.as_str());
            p
        }
    }
}

/// Refuse the conditional gets these stores cannot do.
pub(crate) fn refuse_conditions(
    options: &GetOptions,
    store: &'static str,
) -> object_store::Result<()> {
    if options.if_match.is_some()
        || options.if_none_match.is_some()
        || options.if_modified_since.is_some()
        || options.if_unmodified_since.is_some()
        || options.version.is_some()
    {
        return Err(object_store::Error::NotImplemented {
            operation: "conditional get".into(),
            implementer: store.into(),
        });
    }
    Ok(())
}

/// The answer to a `head` get: the metadata, no bytes.
pub(crate) fn head_result(meta: ObjectMeta) -> GetResult {
    GetResult {
        range: 0..meta.size,
        payload: GetResultPayload::Stream(futures::stream::empty().boxed()),
        meta,
        attributes: Default::default(),
        extensions: Default::default(),
    }
}

/// A successful put (these stores have neither ETags nor versions).
pub(crate) fn put_result() -> PutResult {
    PutResult {
        e_tag: None,
        version: None,
        extensions: Default::default(),
    }
}

/// Every object under `prefix`, folder by folder: memory holds one folder's listing (`read_dir`:
/// its files and subfolders) and the folders still to visit.
pub(crate) fn walk<F, Fut>(
    prefix: Option<&Path>,
    read_dir: F,
) -> BoxStream<'static, object_store::Result<ObjectMeta>>
where
    F: Fn(Path) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = object_store::Result<(Vec<ObjectMeta>, Vec<Path>)>> + Send + 'static,
{
    let read_dir = std::sync::Arc::new(read_dir);
    let start = vec![prefix.cloned().unwrap_or_default()];
    futures::stream::try_unfold(start, move |mut todo| {
        let read_dir = read_dir.clone();
        async move {
            let Some(dir) = todo.pop() else {
                return Ok::<_, object_store::Error>(None);
            };
            let (files, folders) = read_dir(dir).await?;
            todo.extend(folders);
            Ok(Some((
                futures::stream::iter(files.into_iter().map(Ok)),
                todo,
            )))
        }
    })
    .try_flatten()
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_names_stay_in_the_folder_and_are_marked() {
        let p = partial_name(&Path::from("data/ab/abcd"));
        assert!(
            p.as_ref()
                .starts_with("data/ab/abcd.immich-backup-partial-"),
            "{p}"
        );
        let top = partial_name(&Path::from("config"));
        assert!(
            top.as_ref().starts_with("config.immich-backup-partial-"),
            "{top}"
        );
    }
}
