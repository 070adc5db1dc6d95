//! The lock file reader: arbitrary bytes as `app.lock` (a file a user may edit or a
//! repository may carry). Reading must not panic; a lock that reads must write back as
//! text that reads to the same lock.

use hostd_images::lock::Lock;

/// One input: the lock file's bytes.
pub fn run(data: &[u8]) {
    let Ok(dir) = tempfile::tempdir() else {
        return;
    };
    let path = dir.path().join("app.lock");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let Ok(Some(lock)) = Lock::load(&path) else {
        return;
    };
    let text = lock.to_text();
    if std::fs::write(&path, &text).is_err() {
        return;
    }
    match Lock::load(&path) {
        Ok(Some(again)) => assert_eq!(again.to_text(), text, "a lock's text is not stable"),
        other => panic!("the text of a lock that read does not read again: {other:?}"),
    }
}
