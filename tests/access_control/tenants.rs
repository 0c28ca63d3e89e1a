//! The castore scoped by tenant, with one tenant named by its client
//! certificate (`--tenant-from-cert cn`) and others by their tokens: what
//! one tenant stored is NOT_FOUND for another, exactly like a digest nobody
//! stored, until that tenant stores the same bytes itself; an operator
//! sees everything.

use kiln::auth::{CertTenantRule, Security, SecurityOptions};
use kiln::castore::{B3Digest, Directory, Node, PathComponent};
use kiln::client::{connect, ClientSecurity, KilnChannel};
use kiln::proto::{snix_castore, tvix_castore};
use tonic::Code;

use crate::credentials::{client_security, Files, Pki};
use crate::server::Server;

const ALPHA: &str = "alpha-token-0123456789";
const OPS: &str = "ops-token-0123456789";

async fn put_blob(channel: &KilnChannel, bytes: &[u8]) -> B3Digest {
    let chunk = snix_castore::BlobChunk {
        data: bytes.to_vec().into(),
    };
    let put = snix_castore::blob_service_client::BlobServiceClient::new(channel.clone())
        .put(futures::stream::iter([chunk]))
        .await
        .unwrap()
        .into_inner();
    B3Digest::try_from(&put.digest).unwrap()
}

/// Stat and Read (snix and tvix) of `digest`: their codes, `Ok` for served.
async fn blob_codes(channel: &KilnChannel, digest: &B3Digest) -> Vec<Code> {
    let mut codes = Vec::new();
    let digest_bytes: bytes::Bytes = digest.as_bytes().to_vec().into();
    let mut snix = snix_castore::blob_service_client::BlobServiceClient::new(channel.clone());
    codes.push(
        match snix
            .stat(snix_castore::StatBlobRequest {
                digest: digest_bytes.clone(),
                ..Default::default()
            })
            .await
        {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        },
    );
    let read = snix
        .read(snix_castore::ReadBlobRequest {
            digest: digest_bytes.clone(),
        })
        .await;
    codes.push(match read {
        Ok(stream) => {
            let mut stream = stream.into_inner();
            match futures::StreamExt::next(&mut stream).await {
                Some(Err(s)) => s.code(),
                _ => Code::Ok,
            }
        }
        Err(s) => s.code(),
    });
    let mut tvix = tvix_castore::blob_service_client::BlobServiceClient::new(channel.clone());
    codes.push(
        match tvix
            .stat(tvix_castore::StatBlobRequest {
                digest: digest_bytes,
                ..Default::default()
            })
            .await
        {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        },
    );
    codes
}

async fn get_directory(channel: &KilnChannel, digest: &B3Digest) -> Code {
    let mut client =
        snix_castore::directory_service_client::DirectoryServiceClient::new(channel.clone());
    let request = snix_castore::GetDirectoryRequest {
        recursive: true,
        by_what: Some(snix_castore::get_directory_request::ByWhat::Digest(
            digest.as_bytes().to_vec().into(),
        )),
    };
    match client.get(request).await {
        Ok(stream) => {
            let mut stream = stream.into_inner();
            match futures::StreamExt::next(&mut stream).await {
                Some(Ok(_)) => Code::Ok,
                Some(Err(s)) => s.code(),
                None => Code::NotFound,
            }
        }
        Err(s) => s.code(),
    }
}

async fn put_directory(channel: &KilnChannel, directory: &Directory) -> Result<(), Code> {
    let mut client =
        snix_castore::directory_service_client::DirectoryServiceClient::new(channel.clone());
    client
        .put(futures::stream::iter([snix_castore::Directory::from(
            directory,
        )]))
        .await
        .map(|_| ())
        .map_err(|s| s.code())
}

#[tokio::test]
async fn a_tenant_sees_only_what_it_stored_whether_named_by_certificate_or_token() {
    let files = Files::new();
    let server_pki = Pki::new("kiln server CA");
    let client_pki = Pki::new("kiln client CA");
    let (cert, key) = server_pki.server_leaf();
    let security = Security::load(&SecurityOptions {
        tls_cert: Some(files.write("server.pem", &cert)),
        tls_key: Some(files.write("server.key", &key)),
        tls_client_ca: Some(files.write("client-ca.pem", &client_pki.ca_pem)),
        auth_tokens: Some(files.write("tokens", &format!("alpha {ALPHA}\n"))),
        operator_tokens: Some(files.write("operators", &format!("ops {OPS}\n"))),
        tenant_from_cert: CertTenantRule::CommonName,
    })
    .unwrap();
    let server = Server::start_scoped(security).await;
    let addr = format!("https://{}", server.addr.replace("127.0.0.1", "localhost"));
    let channel = |security: ClientSecurity| {
        let addr = addr.clone();
        async move { connect(&addr, &security).await.unwrap() }
    };
    let gamma = channel(client_security(
        &files,
        Some(&server_pki),
        Some(client_pki.client_leaf_named("gamma")),
        None,
    ))
    .await;
    let alpha = channel(client_security(
        &files,
        Some(&server_pki),
        None,
        Some(ALPHA),
    ))
    .await;
    let ops = channel(client_security(&files, Some(&server_pki), None, Some(OPS))).await;

    // gamma (its certificate's CN) stores a blob and a directory naming it.
    let secret = put_blob(&gamma, b"gamma's secret").await;
    let shared = put_blob(&gamma, b"bytes both have").await;
    let mut dir = Directory::new();
    dir.add(
        PathComponent::try_from(&b"secret"[..]).unwrap(),
        Node::File {
            digest: secret,
            size: 14,
            executable: false,
        },
    )
    .unwrap();
    put_directory(&gamma, &dir).await.unwrap();
    assert_eq!(blob_codes(&gamma, &secret).await, vec![Code::Ok; 3]);
    assert_eq!(get_directory(&gamma, &dir.digest()).await, Code::Ok);

    // alpha: NOT_FOUND, as for a digest nobody stored.
    let nobody = B3Digest::from(*blake3::hash(b"stored by nobody").as_bytes());
    assert_eq!(blob_codes(&alpha, &nobody).await, vec![Code::NotFound; 3]);
    assert_eq!(blob_codes(&alpha, &secret).await, vec![Code::NotFound; 3]);
    assert_eq!(blob_codes(&alpha, &shared).await, vec![Code::NotFound; 3]);
    assert_eq!(get_directory(&alpha, &dir.digest()).await, Code::NotFound);
    // Nor can alpha name gamma's directory as a child of its own.
    let mut parent = Directory::new();
    parent
        .add(
            PathComponent::try_from(&b"stolen"[..]).unwrap(),
            dir.as_node(),
        )
        .unwrap();
    assert_eq!(
        put_directory(&alpha, &parent).await,
        Err(Code::InvalidArgument)
    );

    // Storing the same bytes proves alpha has them: those, and only those.
    assert_eq!(put_blob(&alpha, b"bytes both have").await, shared);
    assert_eq!(blob_codes(&alpha, &shared).await, vec![Code::Ok; 3]);
    assert_eq!(blob_codes(&alpha, &secret).await, vec![Code::NotFound; 3]);
    assert_eq!(get_directory(&alpha, &dir.digest()).await, Code::NotFound);

    // The operator sees everything.
    assert_eq!(blob_codes(&ops, &secret).await, vec![Code::Ok; 3]);
    assert_eq!(get_directory(&ops, &dir.digest()).await, Code::Ok);
    // On disk it is stored once.
    assert!(server.store.blobs.has(&shared).await.unwrap());
    server.stop().await;
}
