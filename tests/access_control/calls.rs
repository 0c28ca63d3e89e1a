//! One call to every service, and what its results must be: served for an
//! authenticated caller (OK, or the refusal of an invalid request), refused
//! as UNAUTHENTICATED for everyone else.

use kiln::castore::B3Digest;
use kiln::client::KilnChannel;
use kiln::proto::{kiln_v1, snix_build, snix_castore, tvix_build, tvix_castore};
use tonic::{Code, Status};

/// Every service but health, called once: the answer, or the status.
pub async fn call_every_service(channel: &KilnChannel) -> Vec<(&'static str, Result<(), Status>)> {
    let blob = bytes::Bytes::from_static(b"access control");
    let digest = B3Digest::of(&blob).to_bytes();
    let empty_dir = B3Digest::of(b"").to_bytes();
    let mut results = Vec::new();

    let mut tvix_blobs = tvix_castore::blob_service_client::BlobServiceClient::new(channel.clone());
    let chunk = tvix_castore::BlobChunk { data: blob.clone() };
    let put = tvix_blobs
        .put(futures::stream::iter([chunk]))
        .await
        .map(|r| assert_eq!(r.into_inner().digest, digest, "tvix blob put digest"));
    results.push(("tvix blob put", put));

    let mut snix_blobs = snix_castore::blob_service_client::BlobServiceClient::new(channel.clone());
    let stat = snix_blobs
        .stat(snix_castore::StatBlobRequest {
            digest: digest.clone(),
            ..Default::default()
        })
        .await
        .map(drop);
    results.push(("snix blob stat", stat));

    let mut tvix_dirs =
        tvix_castore::directory_service_client::DirectoryServiceClient::new(channel.clone());
    let put = tvix_dirs
        .put(futures::stream::iter([tvix_castore::Directory::default()]))
        .await
        .map(|r| assert_eq!(r.into_inner().root_digest, empty_dir, "tvix directory put"));
    results.push(("tvix directory put", put));

    let mut snix_dirs =
        snix_castore::directory_service_client::DirectoryServiceClient::new(channel.clone());
    let get = async {
        let request = snix_castore::GetDirectoryRequest {
            by_what: Some(snix_castore::get_directory_request::ByWhat::Digest(
                empty_dir.clone(),
            )),
            recursive: false,
        };
        let mut stream = snix_dirs.get(request).await?.into_inner();
        let first = stream.message().await?;
        assert!(first.is_some(), "snix directory get returns the directory");
        Ok(())
    }
    .await;
    results.push(("snix directory get", get));

    let mut tvix_build = tvix_build::build_service_client::BuildServiceClient::new(channel.clone());
    let build = tvix_build
        .do_build(tvix_build::BuildRequest::default())
        .await
        .map(drop);
    results.push(("tvix build", build));

    let mut snix_build = snix_build::build_service_client::BuildServiceClient::new(channel.clone());
    let build = snix_build
        .do_build(snix_build::BuildRequest::default())
        .await
        .map(drop);
    results.push(("snix build", build));

    let mut events = kiln_v1::build_events_client::BuildEventsClient::new(channel.clone());
    let submit = events
        .submit(kiln_v1::SubmitRequest {
            request: Some(kiln_v1::submit_request::Request::Snix(
                snix_build::BuildRequest::default(),
            )),
            argv0: String::new(),
            limits: None,
        })
        .await
        .map(drop);
    results.push(("kiln events submit", submit));
    let watch = events
        .watch(kiln_v1::WatchRequest {
            build_id: "no-such-build".into(),
        })
        .await
        .map(drop);
    results.push(("kiln events watch", watch));

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut reflection = ServerReflectionClient::new(channel.clone());
    let list = async {
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = reflection
            .server_reflection_info(futures::stream::iter([request]))
            .await?
            .into_inner();
        let answer = stream.message().await?;
        assert!(answer.is_some(), "reflection lists the services");
        Ok(())
    }
    .await;
    results.push(("reflection", list));
    results
}

/// Whether the health service answers SERVING.
pub async fn health_serving(channel: &KilnChannel) -> Result<bool, Status> {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let answer = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    Ok(answer.into_inner().status
        == tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
}

/// What an authenticated caller gets from [`call_every_service`].
pub fn assert_served(results: &[(&str, Result<(), Status>)]) {
    for (name, result) in results {
        let expected = match *name {
            "tvix build" | "snix build" | "kiln events submit" => Some(Code::InvalidArgument),
            "kiln events watch" => Some(Code::NotFound),
            _ => None,
        };
        match (result, expected) {
            (Ok(()), None) => {}
            (Err(status), Some(code)) if status.code() == code => {}
            _ => panic!("{name}: expected {expected:?} (None = OK), got {result:?}"),
        }
    }
}

/// Every call refused as UNAUTHENTICATED.
pub fn assert_refused(results: &[(&str, Result<(), Status>)], why: &str) {
    assert_eq!(results.len(), 9);
    for (name, result) in results {
        match result {
            Err(status) if status.code() == Code::Unauthenticated => {}
            other => panic!("{why}: {name} must be UNAUTHENTICATED, got {other:?}"),
        }
    }
}
