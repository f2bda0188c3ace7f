// Declaration only (android_demo/apicheck/README.md): the members the app shell uses, as in ONNX Runtime's Java API.
package ai.onnxruntime;

public abstract class OnnxTensorLike implements OnnxValue {
    OnnxTensorLike() {} // package-private, as the real constructor
}
