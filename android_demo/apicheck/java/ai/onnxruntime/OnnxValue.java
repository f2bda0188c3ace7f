// Declaration only (android_demo/apicheck/README.md): the members the app shell uses, as in ONNX Runtime's Java API.
package ai.onnxruntime;

public interface OnnxValue extends AutoCloseable {
    @Override
    void close();
}
