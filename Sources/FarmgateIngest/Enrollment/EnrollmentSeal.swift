import Crypto

/// Seals a device key with a key derived from the enrollment token that produced it, so that the store can keep it for
/// the grace window (an exchange whose answer was lost is answered again with the same key) without holding anything a
/// stolen database would open: the store keeps only the SHA-256 of the token's secret, and the sealing key is derived
/// from the secret itself (HKDF-SHA256, the token id as salt), so only the holder of the token can open it.
///
/// AES-256-GCM: the sealed form is nonce, ciphertext and tag (`AES.GCM.SealedBox.combined`).
enum EnrollmentSeal {
    /// Why a key could not be sealed (AES-GCM refused: cannot happen with a 32-byte key and a random nonce).
    struct Failure: Error, CustomStringConvertible {
        var description: String { "the new device key could not be sealed for the grace window" }
    }

    /// The sealing key of `token`.
    static func key(for token: APIKey) -> SymmetricKey {
        HKDF<SHA256>.deriveKey(
            inputKeyMaterial: SymmetricKey(data: Array(token.secret.utf8)), salt: Array(token.keyID.utf8),
            info: Array("farmgate enrollment seal v1".utf8), outputByteCount: 32)
    }

    /// `deviceKey` sealed with `token`'s key.
    static func seal(_ deviceKey: String, with token: APIKey) throws -> [UInt8] {
        let box = try AES.GCM.seal(Array(deviceKey.utf8), using: key(for: token))
        guard let combined = box.combined else { throw Failure() }
        return Array(combined)
    }

    /// The device key sealed in `sealed`, or nil when `token` is not the token that sealed it (or the bytes are damaged).
    static func open(_ sealed: [UInt8], with token: APIKey) -> String? {
        guard let box = try? AES.GCM.SealedBox(combined: sealed), let plain = try? AES.GCM.open(box, using: key(for: token)) else {
            return nil
        }
        return String(decoding: plain, as: UTF8.self)
    }
}
