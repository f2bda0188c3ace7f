// Declaration only (android_demo/apicheck/README.md): the members the app shell uses, as in ONNX Runtime's Java API.
// Real: also implements AutoCloseable (not used by the shell).
package ai.onnxruntime;

public final class OrtEnvironment {
    private OrtEnvironment() {} // made by getEnvironment

    public static OrtEnvironment getEnvironment() {
        throw new UnsupportedOperationException("declaration only");
    }

    public OrtSession createSession(String modelPath, OrtSession.SessionOptions options) throws OrtException {
        throw new UnsupportedOperationException("declaration only");
    }
}
